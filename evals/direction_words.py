"""How far apart MiniLM holds the direction words the tiny models read (issue #27: held-out wordings such as "under"
and "on the right side of" are drawn mirrored). Prints the cosine similarity of each word's token state in "a square
WORD a circle", and of the pooled vectors of whole captions, trained and held-out words side by side.

    python evals/direction_words.py
"""

import torch

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
    text = load_minilm(max_length=32)

    def encode(prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        txt, vec = text.encode_uncached([prompt])
        return txt[0], vec[0]

    # "[CLS] a square WORD": every word here is one token, so its state is at position 3
    table("token state of the word in 'a square WORD a circle'",
          {w: encode(f"a square {w} a circle")[0][3] for w in VERTICAL})
    table("pooled vector of 'a circle WORDS a square'", {w: encode(f"a circle {w} a square")[1] for w in HORIZONTAL})


if __name__ == "__main__":
    main()
