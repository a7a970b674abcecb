"""How far apart MiniLM holds the direction words the tiny models read (issue #27: held-out wordings such as "under"
and "on the right side of" are drawn mirrored). Prints the cosine similarity of each word's token state in "a square
WORD a circle", and of the pooled vectors of whole captions, trained and held-out words side by side. Then a linear
probe: a logistic regression fit on the trained relation phrases (fluxion.data.captions.RICH_WORDINGS) in random
captions, asked which way each held-out phrase points; if it cannot tell, neither can a model that reads the same
states.

    python evals/direction_words.py [--models runs/tiny-pro-sizes5/model ...]
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from fluxion.data import CaptionStyle, ShapesDataset, describe
from fluxion.data.captions import RICH_WORDINGS, draw_wording
from fluxion.checkpoints import load_transformer
from fluxion.text import load_minilm

VERTICAL = ["under", "over", "below", "beneath", "underneath", "above", "atop"]  # the first two held out
HORIZONTAL = ["on the right side of", "on the left side of", "on the right of", "on the left of"]  # ditto


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def table(title: str, states: dict[str, torch.Tensor]) -> None:
    width = max(map(len, states)) + 6
    print(f"\n{title}\n{'':{width}}" + "".join(f"{f'({i})':>7}" for i in range(len(states))))
    for i, (w, x) in enumerate(states.items()):
        print(f"{f'({i}) {w}':{width}}" + "".join(f"{cosine(x, y):7.2f}" for y in states.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=[], type=Path,
                        help="model folders whose txt_in projection of the states is probed too")
    args = parser.parse_args()
    text = load_minilm(max_length=32)

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        txt, vec = text.encode_uncached([prompt])
        return txt[0], vec[0]

    # "[CLS] a square WORD": every word here is one token, so its state is at position 3
    table("token state of the word in 'a square WORD a circle'",
          {w: encode(f"a square {w} a circle")[0][3] for w in VERTICAL})
    table("pooled vector of 'a circle WORDS a square'", {w: encode(f"a circle {w} a square")[1] for w in HORIZONTAL})
    projections = {"MiniLM state": lambda z: z}
    for folder in args.models:
        projections[f"txt_in projection of {folder}"] = load_transformer(folder / "transformer.safetensors").txt_in
    probe(text, projections)


RELATIONS = ("left", "right", "above", "below")
# A fifth class: the connectives of a pair named without its relation ("{a} plus {b}"), which the tiny models draw
# in reading order; a phrase read as one of these is drawn as if it named no relation.
CONNECTIVES = tuple(p.split("{a} ")[1].split(" {b}")[0] for p in RICH_WORDINGS["pair"][0] if p.startswith("{a} "))
CLASSES = RELATIONS + ("and",)


def relation_features(text, phrase_of, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For n random relation scenes in random trained wordings, with the relation phrased by phrase_of(relation,
    rng): the mean MiniLM state of the relation phrase's tokens and the phrase's class (CLASSES)."""
    ds = ShapesDataset(seed=seed, length=n, p_relation=1.0, layout="halves")
    rng = np.random.default_rng(seed)
    texts, spans, labels = [], [], []
    for i in range(n):
        scene = ds.scene(i)[0]
        relation = RELATIONS[["left of", "right of", "above", "below"].index(scene.relation)]
        relation = "and" if rng.random() < 0.2 else relation
        phrase = phrase_of(relation, rng)
        # the words around the relation drawn as in training; the phrase is put in by hand
        wording = draw_wording(rng, RICH_WORDINGS)
        style = CaptionStyle(color=bool(rng.random() < 0.7), wording=wording)
        before, after = describe(scene, style).split(f" {wording.relation(scene.relation)} ", 1)
        texts.append(f"{before} {phrase} {after}")
        start = n_tokens(text, before) - 1  # without [SEP]: the phrase's first token
        spans.append((start, start + n_tokens(text, phrase) - 2))
        labels.append(CLASSES.index(relation))
    states = torch.cat([text.encode_uncached(texts[k:k + 64])[0] for k in range(0, n, 64)]).float()
    features = torch.stack([states[k, a:b].mean(0) for k, (a, b) in enumerate(spans)])
    return features, torch.tensor(labels)


def n_tokens(text, words: str) -> int:
    """Tokens of `words` with [CLS] and [SEP] (the encoder pads and truncates per call, so turn both off first)."""
    text.tokenizer.no_padding()
    text.tokenizer.no_truncation()
    return len(text.tokenizer.encode(words).ids)


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int):
    """A multinomial logistic regression on standardised features (L-BFGS, a little L2): features -> class."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy((x - mean) / std @ w + b, y) + 1e-3 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: ((z - mean) / std @ w + b).argmax(1)


def probe(text, projections: dict) -> None:
    """For each projection of the states (the states themselves, a model's txt_in), a probe fit on the trained
    phrases, then asked about the spec's phrase and the held-out ones of each direction."""
    trained = {r: RICH_WORDINGS[r][0] for r in RELATIONS} | {"and": CONNECTIVES}
    x, y = relation_features(text, lambda r, rng: trained[r][rng.integers(len(trained[r]))], 2000, seed=1)
    tests = {}
    for r in RELATIONS:
        for phrase in RICH_WORDINGS[r][0][:1] + RICH_WORDINGS[r][1]:
            xt, yt = relation_features(text, lambda rel, rng: phrase if rel == r else trained[rel][0], 400, seed=2)
            tests[r, phrase] = xt[yt == RELATIONS.index(r)]
    for name, project in projections.items():
        with torch.no_grad():
            read = fit_probe(project(x), y, len(CLASSES))
            print(f"\nlinear probe of the relation phrase's mean {name} (4 directions and the pair connectives; fit "
                  "on the trained phrases)")
            for (r, phrase), xt in tests.items():
                pred = read(project(xt))
                counts = {c: int((pred == k).sum()) for k, c in enumerate(CLASSES)}
                held = "held out" if phrase in RICH_WORDINGS[r][1] else "trained"
                print(f"  {phrase!r:26} ({held:8}, means {r}): read as {counts}")


if __name__ == "__main__":
    main()
