"""Where the held-out wordings lose, word by word: from the per-image records `evals/family_sizes.py` keeps (one folder
per model, size, seed and spec under DIR), the image accuracy of the prompts of evals/shapes-phrasings.jsonl that use
each held-out wording, beside the accuracy of the same entries in the spec's wording (evals/shapes.jsonl), pooled
over the seed sets found. Worst loss first. Then, for the held-out relation wordings, where the two objects were
drawn: on the axis the relation names, and with the first-named object left of or above the other (reading order).

    python evals/heldout_words.py runs/eval/family-sizes              # every size found, tiny-pro
    python evals/heldout_words.py runs/eval/phr-rich/family-sizes --model tiny-pro --sizes 64x64
"""

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from fluxion.data.captions import WORDINGS

SIZES = ["64x64", "128x128", "128x64", "64x128"]
HELD_OUT_RELATIONS = {"on the left side of": "x", "on the right side of": "x", "over": "y", "under": "y"}
SHAPE = re.compile(r"\b(circle|square|triangle|star)\b")


def held_out_patterns() -> dict[str, re.Pattern]:
    """Each held-out wording ("on the right side of", "both {a} and {b}") as a regex of its words, any text in
    its inner slots."""
    patterns = {}
    for _, held in WORDINGS.values():
        for wording in held:
            parts = [p.strip() for p in re.split(r"\{\w*\}", wording)]
            words = " .+? ".join(re.escape(p) for p in parts if p)
            patterns[wording] = re.compile(rf"\b{words}\b")
    return patterns


def records(folder: Path, model: str, size: str, spec: str) -> list[dict]:
    return [r for path in sorted(folder.glob(f"{model}_{size}_seed=*_{spec}/results.json"))
            for r in json.loads(path.read_text())["records"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="the family-sizes folder of an evals/family_sizes.py run")
    parser.add_argument("--model", default="tiny-pro")
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    args = parser.parse_args()

    patterns = held_out_patterns()
    for size in args.sizes:
        phrased, trained = (records(args.folder, args.model, size, spec) for spec in ("phrasings", "shapes"))
        if not phrased or not trained:
            continue
        by_entry = defaultdict(list)
        for r in trained:
            by_entry[r["entry"]].append(r["correct"])
        rows = defaultdict(lambda: [0, 0, 0.0])  # wording -> [correct, images, the same entries' spec accuracy]
        for r in phrased:
            for wording, pattern in patterns.items():
                if pattern.search(r["prompt"]):
                    row = rows[wording]
                    row[0] += r["correct"]
                    row[1] += 1
                    row[2] += sum(by_entry[r["entry"]]) / len(by_entry[r["entry"]])
        print(f"\n{args.model} {size}: images right {sum(r['correct'] for r in phrased) / len(phrased):.3f} in the "
              f"held-out wordings, {sum(r['correct'] for r in trained) / len(trained):.3f} in the spec's")
        print("| held-out wording | images | right in it | right in the spec's |\n| --- | ---: | ---: | ---: |")
        for wording, (right, n, spec_right) in sorted(rows.items(), key=lambda kv: (kv[1][0] - kv[1][2]) / kv[1][1]):
            print(f"| {wording} | {n} | {right / n:.2f} | {spec_right / n:.2f} |")
        print("| held-out relation | both objects found | on its axis | first-named left of / above the other |\n"
              "| --- | ---: | ---: | ---: |")
        for wording, axis in HELD_OUT_RELATIONS.items():
            print(f"| {wording} | " + " | ".join(map(str, layouts(phrased, patterns[wording], axis))) + " |")


def layouts(phrased: list[dict], pattern: re.Pattern, axis: str) -> tuple[int, int, int]:
    """Images of prompts matching `pattern` with both named objects detected; of them, how many lie further apart
    along `axis` ("x" or "y") than across it, and how many have the first-named object first in reading order."""
    found = on_axis = reading_order = 0
    k = "xy".index(axis)
    for r in phrased:
        names = SHAPE.findall(r["prompt"])
        if not pattern.search(r["prompt"]) or len(names) != 2:
            continue
        centres = {d["cls"]: d["centroid"] for d in r["detections"]}
        if not set(names) <= set(centres):
            continue
        first, second = centres[names[0]], centres[names[1]]
        found += 1
        on_axis += abs(first[k] - second[k]) > abs(first[1 - k] - second[1 - k])
        reading_order += first[k] < second[k]
    return found, on_axis, reading_order


if __name__ == "__main__":
    main()
