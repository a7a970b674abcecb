"""Caption wordings: varied training captions still say what is drawn, and held-out wordings never reach training."""

import re
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxion.data import CaptionStyle, ShapesDataset, describe, group_scene, relation_scene
from fluxion.data import captions
from fluxion.data.captions import RICH_EXTRA, RICH_WORDINGS, WORDINGS, Wording, draw_wording, held_out_wording
from fluxion.data.shapes import INVERSE_RELATION
from fluxion.errors import InputError
from fluxion.eval import load_spec
from fluxion.training.batches import FeatureCache

ROOT = Path(__file__).resolve().parents[1]


def _pattern(wording: str) -> re.Pattern:
    """A wording as a regex: its words literal, a slot between words ('{a} and {b}') any text; slots at the ends
    are left out."""
    parts = [p.strip() for p in re.split(r"\{\w*\}", wording)]
    while parts and not parts[0]:
        parts.pop(0)
    while parts and not parts[-1]:
        parts.pop()
    return re.compile(r"\b" + " .+? ".join(map(re.escape, parts)) + r"\b")


HELD_OUT = [_pattern(h) for _, held in WORDINGS.values() for h in held]


def _held_out_phrases(text: str) -> list[str]:
    return [p.pattern for p in HELD_OUT if p.search(text)]


@pytest.mark.parametrize("table", [WORDINGS, RICH_WORDINGS], ids=["varied", "rich"])
def test_wordings_default_to_the_spec_grammar_and_every_trained_one_is_drawn(table):
    assert set(RICH_WORDINGS) == {f.name for f in fields(Wording)} and set(WORDINGS) <= set(RICH_WORDINGS)
    assert all(table[f.name][0][0] == f.default for f in fields(Wording) if f.name in table)
    rng = np.random.default_rng(0)
    seen = defaultdict(set)
    for _ in range(5000):
        for name, value in vars(draw_wording(rng, table)).items():
            seen[name].add(value)
    trained = {f.name: set(table[f.name][0]) if f.name in table else {f.default} for f in fields(Wording)}
    assert trained == dict(seen)  # fields the table lacks keep their default


def test_rich_wordings_share_no_word_stem_with_a_held_out_wording():
    """The rich extras must not teach a held-out word by another form ("show" for "showing", "colored")."""
    def words(phrases):
        return {w for p in phrases for w in re.findall(r"[a-z]+", re.sub(r"\{\w*\}", "", p))}

    held = words(h for _, out in WORDINGS.values() for h in out) - words(t for tr, _ in WORDINGS.values() for t in tr)
    assert {"showing", "side", "under", "coloured", "sits", "both", "with"} <= held
    extra = words(o for options in RICH_EXTRA.values() for o in options)
    assert not {(w, h) for w in extra for h in held if w[:4] == h[:4]}
    assert all(RICH_WORDINGS[name][1] == WORDINGS[name][1] for name in WORDINGS)  # the same held-out set


def test_wordings_phrase_the_scene():
    rng = np.random.default_rng(0)
    scene = relation_scene(rng, (64, 64), ("triangle", "purple", "small"), ("circle", "yellow", "large"), "above",
                           "black")
    wording = Wording(frame="a picture of {}", one="one", color="{noun} in {color}", above="on top of",
                      background="against a {} background", end=".")
    style = CaptionStyle(color=True, size=True, background=True, wording=wording)
    assert describe(scene, style) == ("a picture of one small triangle in purple on top of one large circle in "
                                      "yellow against a black background.")
    inverse = CaptionStyle(color=False, form="inverse", wording=Wording(clause="{a} is {relation} {b}",
                                                                        below="beneath"))
    assert describe(scene, inverse) == "a circle is beneath a triangle"
    three = group_scene(rng, (64, 64), "square", "orange", 3, "small", "white")
    assert describe(three, CaptionStyle(wording=Wording(count="{digit}"))) == "3 orange squares"
    assert describe(three, CaptionStyle(wording=Wording(count="exactly {word}", color="{noun} coloured {color}"))) \
        == "exactly three squares coloured orange"


@pytest.mark.parametrize("table", [WORDINGS, RICH_WORDINGS], ids=["varied", "rich"])
def test_varied_captions_name_each_relation_in_its_direction(table):
    """Whatever the wording, the relation phrase sits between the two objects in the drawn direction, and each
    named colour is its own object's."""
    ds = ShapesDataset(seed=5, length=400, p_relation=1.0, captions="varied")
    rng = np.random.default_rng(1)
    for i in range(len(ds)):
        scene = ds.scene(i)[0]
        wording = draw_wording(rng, table)
        for form in ("relation", "inverse"):
            style = CaptionStyle(color=True, form=form, wording=wording)
            text = describe(scene, style)
            a, b = scene.objects if form == "relation" else scene.objects[::-1]
            relation = scene.relation if form == "relation" else INVERSE_RELATION[scene.relation]
            before, after = text.split(f" {wording.relation(relation)} ", 1)
            assert a.shape in before and a.color in before and b.shape in after and b.color in after, text
            assert b.shape not in before.split() and a.shape not in after.split(), text


@pytest.mark.parametrize("mode", ["varied", "rich"])
def test_held_out_wordings_never_reach_training_captions(mode):
    ds = ShapesDataset(seed=2, length=4000, p_relation=0.75, layout="halves", captions=mode,
                       captions_per_image=2)
    texts = [t for i in range(2000) for t in ds.captions(i)]
    assert len(set(texts)) > 0.8 * len(texts)  # many phrasings, not a few templates
    assert not [(t, _held_out_phrases(t)) for t in texts if _held_out_phrases(t)]
    assert ds.captions(7)[0] == ds.scene(7)[1] and ds.captions(7) == ds.captions(7)
    # the template captions (every recipe before #27) keep the spec's wording only
    plain = ShapesDataset(seed=2, length=500, p_relation=0.75)
    assert not any(re.search(r"\d|\bplus\b|\bin the picture\b|\.", plain.scene(i)[1]) for i in range(500))
    with pytest.raises(InputError, match="captions must be one of"):
        ShapesDataset(captions="fancy")
    with pytest.raises(InputError, match="captions_per_image"):
        ShapesDataset(captions_per_image=0)


def test_held_out_phrasing_spec_asks_for_the_same_scenes_in_unseen_words():
    spec = load_spec(ROOT / "evals" / "shapes.jsonl")
    phrased = load_spec(ROOT / "evals" / "shapes-phrasings.jsonl")
    assert len(spec) == len(phrased)
    for entry, other in zip(spec, phrased):
        assert {k: v for k, v in entry.items() if k != "prompt"} == {k: v for k, v in other.items() if k != "prompt"}
        assert other["prompt"] != entry["prompt"] and _held_out_phrases(other["prompt"]), other
        assert not _held_out_phrases(entry["prompt"])
        for req in entry["include"]:  # the shapes, colours and counts are still named
            assert req["class"] in other["prompt"] and req.get("color", "") in other["prompt"]
    wording = held_out_wording(np.random.default_rng(0), ("frame", "clause", "left"), p=1.0)
    assert wording.frame == Wording.frame  # a sentence ("a sits left of b") is not framed


def test_feature_cache_reads_each_of_an_items_captions_in_turn():
    latents = [torch.zeros(4, 16, 2, 2)]
    txt = torch.arange(8.0).reshape(8, 1, 1).expand(8, 1, 3).contiguous()  # row r holds r
    cache = FeatureCache(latents, torch.arange(8).reshape(4, 2), txt, torch.arange(8.0)[:, None],
                         torch.zeros(1, 1, 3), torch.zeros(1, 1))
    rows = [cache.batch([0, 1, 2, 3], epoch)[2][:, 0].tolist() for epoch in range(3)]
    assert rows == [[0, 3, 4, 7], [1, 2, 5, 6], [0, 3, 4, 7]]  # item i, epoch e: caption (e + i) % 2


def test_a_cache_of_varied_captions_is_keyed_by_the_wordings(tmp_path, monkeypatch):
    """Changing the grammar must not let training read captions cached under the old one."""
    from types import SimpleNamespace

    from fluxion.training import batches

    ae = tmp_path / "ae.safetensors"
    ae.write_bytes(b"weights")
    encoder = SimpleNamespace(max_length=32, context_dim=384)
    varied = ShapesDataset(seed=1, length=10, captions="varied")
    before = batches.cache_key(ae, varied, encoder)
    template = batches.cache_key(ae, ShapesDataset(seed=1, length=10), encoder)
    rich = batches.cache_key(ae, ShapesDataset(seed=1, length=10, captions="rich"), encoder)
    monkeypatch.setitem(captions.WORDINGS, "end", (("", "!"), ()))
    assert batches.cache_key(ae, varied, encoder) != before
    assert rich not in (before, template)
    halves = {"seed": 1, "length": 10, "captions": "rich", "layout": "halves"}
    assert batches.cache_key(ae, ShapesDataset(**halves, balance_order=True), encoder) != \
        batches.cache_key(ae, ShapesDataset(**halves), encoder)
    assert batches.cache_key(ae, ShapesDataset(seed=1, length=10), encoder) == template  # templates: no wordings


def test_balanced_order_names_the_left_or_upper_object_first_half_the_time():
    """With reading order, the plain forms always name the left/upper object first; balance_order makes relation
    captions name it first less often, so that over all pair captions the order tells nothing."""
    def left_or_upper_first(balance: bool) -> float:
        ds = ShapesDataset(seed=3, length=3000, p_relation=1.0, layout="halves", captions="rich",
                           balance_order=balance)
        hits = 0
        for i in range(len(ds)):
            scene, text = ds.scene(i)
            a, b = scene.objects  # a pair of two shapes; a is `relation` of b
            first = a if text.index(a.shape) < text.index(b.shape) else b
            hits += first is (a if scene.relation in ("left of", "above") else b)
        return hits / len(ds)

    assert left_or_upper_first(False) == pytest.approx(0.65, abs=0.03)
    assert left_or_upper_first(True) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(InputError, match="balance_order needs layout='halves'"):
        ShapesDataset(balance_order=True)


def test_rich_captions_fit_the_models_text_length():
    """The sizes chain reads 32 MiniLM tokens: a rich caption past them loses its end (docs: 1 in 40000)."""
    from fluxion.text import load_minilm

    tokenizer = load_minilm(max_length=32).tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    ds = ShapesDataset(seed=14, length=20000, buckets=[(64, 64)], p_relation=0.75, layout="halves", captions="rich",
                       captions_per_image=2)
    lengths = [len(e.ids) for e in tokenizer.encode_batch([t for i in range(len(ds)) for t in ds.captions(i)])]
    assert len(lengths) == 40000 and sum(n > 32 for n in lengths) <= 1 and max(lengths) <= 34
