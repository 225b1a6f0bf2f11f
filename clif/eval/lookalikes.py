"""Look-alike pairs as a ready evaluation set: DreamBench subjects that are easy to mix up (names, classes).

MuDI's category set (github.com/agwmon/MuDI, `dataset/category/`) pairs similar subjects, mostly from DreamBench
(two dogs, a monster toy and a robot toy, ...). `dataset/lookalikes_dreambench.json` ships the pairs that
DreamBench subjects form -- MuDI's own where both are DreamBench subjects, plus same-class DreamBench pairs --
and `dataset/prompts_lookalike.txt` two-subject prompts of our own. No image is shipped: the references are
read from a DreamBench checkout (`--dreambench DIR`, DIR/<subject>/*.jpg).

    python -m clif.eval.lookalikes list
    python -m clif.eval.lookalikes concepts --dreambench DIR --pair dog dog2 --out runs/dog-dog2/data
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clif.concepts import load_concept_set
from clif.errors import UserError

DATASET = Path(__file__).resolve().parents[2] / "dataset"
BUILTIN = {"dreambench": DATASET / "lookalikes_dreambench.json"}


@dataclass(frozen=True)
class Subject:
    name: str
    class_word: str
    initializer: str


@dataclass(frozen=True)
class Pair:
    a: str
    b: str
    basis: str

    @property
    def key(self) -> tuple[str, str]:
        return tuple(sorted((self.a, self.b)))


@dataclass
class LookalikeSet:
    subjects: dict[str, Subject]
    pairs: list[Pair]
    prompts: Path | None
    source: Path


def _field(obj: dict, key: str, kind: type, where: str):
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise UserError(f"{where}: needs {key!r} as {kind.__name__}")
    return obj[key]


def load_pairs(spec: str) -> LookalikeSet:
    """'dreambench' (the shipped set) or a JSON file of the same form; UserError naming what is wrong."""
    path = BUILTIN.get(spec, Path(spec))
    if not path.is_file():
        raise UserError(f"--pairs {spec!r}: no such file (or use a built-in set: {', '.join(BUILTIN)})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    subjects = {}
    for name, s in _field(data, "subjects", dict, str(path)).items():
        at = f"{path}: subject {name!r}"
        cls, init = _field(s, "class", str, at), _field(s, "initializer", str, at)
        if len(init.split()) != 1:
            raise UserError(f"{at}: initializer {init!r} must be a single word")
        subjects[name] = Subject(name, cls, init)
    pairs, seen = [], set()
    for i, p in enumerate(_field(data, "pairs", list, str(path))):
        at = f"{path}: pair #{i}"
        a, b = _field(p, "a", str, at), _field(p, "b", str, at)
        for n in (a, b):
            if n not in subjects:
                raise UserError(f"{at}: subject {n!r} is not in 'subjects'")
        if a == b:
            raise UserError(f"{at}: a pair needs two different subjects, got {a!r} twice")
        pair = Pair(a, b, p.get("basis", "") if isinstance(p.get("basis", ""), str) else "")
        if pair.key in seen:
            raise UserError(f"{at}: pair {a!r} / {b!r} is listed twice")
        seen.add(pair.key)
        pairs.append(pair)
    if not pairs:
        raise UserError(f"{path}: no pairs")
    prompts = data.get("prompts")
    return LookalikeSet(subjects, pairs, path.parent / prompts if isinstance(prompts, str) else None, path)


def concept_entry(s: Subject, root: Path) -> dict:
    """A concepts.json entry for subject `s` whose references are `root`/<name> (absolute path, not copied)."""
    return {
        "name": s.name,
        "token": f"<{s.name}>",
        "initializer": s.initializer,
        "class": s.class_word,
        "images": str((root / s.name).resolve()),
    }


def write_concepts(lset: LookalikeSet, names: list[str], root: Path, out: Path) -> Path:
    """`out`/concepts.json for `names` with references under `root` (the training data of one pair)."""
    for n in names:
        if n not in lset.subjects:
            raise UserError(f"subject {n!r} is not in {lset.source}")
        if not (root / n).is_dir():
            raise UserError(f"{root / n} is not a folder (--dreambench must be the DreamBench dataset folder)")
    out.mkdir(parents=True, exist_ok=True)
    spec = {"concepts": [concept_entry(lset.subjects[n], root) for n in names]}
    (out / "concepts.json").write_text(json.dumps(spec, indent=2) + "\n")
    return out


def present_subjects(lset: LookalikeSet, root: Path) -> list[str]:
    """The subjects of the set's pairs whose folders exist under `root`, in the set's order."""
    names = []
    for p in lset.pairs:
        for n in (p.a, p.b):
            if n not in names and (root / n).is_dir():
                names.append(n)
    return names


def present_concepts(lset: LookalikeSet, root: Path) -> list:
    """The concepts of the pairs set's subjects found under `root` (tokens <subject>), validated like any set."""
    with tempfile.TemporaryDirectory() as tmp:
        write_concepts(lset, present_subjects(lset, root), root, Path(tmp))
        return load_concept_set(tmp)


def mark_pairs(per_pair: list[dict], lset: LookalikeSet) -> list[dict]:
    """Per-pair report rows annotated with the set's basis; pairs of the set without images listed as absent."""
    basis = {p.key: p.basis for p in lset.pairs}
    out = [{**e, "lookalike": tuple(e["pair"]) in basis, "basis": basis.get(tuple(e["pair"]))} for e in per_pair]
    have = {tuple(e["pair"]) for e in per_pair}
    out += [{"pair": list(k), "images": 0, "lookalike": True, "basis": b} for k, b in basis.items() if k not in have]
    return out


def main(argv: list[str] | None = None) -> None:
    from clif import cli

    p = cli.make_parser("python -m clif.eval.lookalikes", __doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="Print the pairs of a set.")
    ls.add_argument("--pairs", default="dreambench", help="'dreambench' or a pairs JSON file.")
    cs = sub.add_parser("concepts", help="Write concepts.json for one pair (the training data).")
    cs.add_argument("--pairs", default="dreambench", help="'dreambench' or a pairs JSON file.")
    cs.add_argument("--dreambench", required=True, help="The DreamBench dataset folder (<subject>/*.jpg).")
    cs.add_argument("--pair", nargs=2, required=True, metavar=("A", "B"), help="The two subjects.")
    cs.add_argument("--out", required=True, help="Folder for concepts.json.")
    args = p.parse_args(argv)
    with cli.user_errors("python -m clif.eval.lookalikes"):
        lset = load_pairs(args.pairs)
        if args.cmd == "list":
            for pr in lset.pairs:
                sa, sb = lset.subjects[pr.a], lset.subjects[pr.b]
                print(f"{pr.a} ({sa.class_word}) / {pr.b} ({sb.class_word}): {pr.basis}")
        else:
            print(write_concepts(lset, list(args.pair), Path(args.dreambench), Path(args.out)) / "concepts.json")


if __name__ == "__main__":
    main()
