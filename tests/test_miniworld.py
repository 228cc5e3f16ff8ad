"""The miniature world's groundwork: deterministic scenes, the unnamed detail in the pixels, tasks that
answer truthfully, a word-level tokenizer, and the pretraining losses on a real step."""

import random
from pathlib import Path

import numpy as np
import pytest

from yollava.backbone import BackboneError, load_backbone
from miniworld import tasks, world
from miniworld.model import build_mini_tokenizer


def test_scenes_deterministic_in_seed():
    a = world.random_scene(random.Random(3))
    b = world.random_scene(random.Random(3))
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))


def test_every_attribute_changes_the_pixels_and_notch_has_no_word():
    o = world.ALL_OBJECTS[17]
    for kind, others in o.variants().items():
        for other in others:
            assert not np.array_equal(world.draw(o), world.draw(other)), (kind, other)
    notch_twin = o.variants()["notch"][0]
    assert tasks.in_words(notch_twin) == tasks.in_words(o)  # words cannot tell them apart


def test_tasks_answer_truthfully():
    rng = random.Random(0)
    for _ in range(200):
        t = tasks.existence(rng)
        q = t.messages[0].text
        assert t.messages[1].text == ("yes." if t.correct == 0 else "no.")
        desc = q[len("is there "):-len(" in this photo?")]
        present = any(tasks.in_words(o, attrs) == desc for o in t.scene.objects()
                      for attrs in [("shape",), ("colour",), ("colour", "shape"), ("colour", "pattern", "shape"),
                                    ("pattern", "shape")])
        assert present == (t.correct == 0)
    for _ in range(200):
        t = tasks.naming(rng, by_example=True)
        target = t.definition.examples[0][0].cells[t.definition.examples[0][1]]
        assert (target in t.scene.objects()) == (t.correct == 0)


def test_word_tokenizer_round_trip():
    tok = build_mini_tokenizer()
    text = "is there a red striped circle in this photo?"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.convert_tokens_to_ids("<image>") != tok.unk_token_id


def test_mini_without_weights_is_a_clear_error(monkeypatch, tmp_path):
    from yollava import backbone

    monkeypatch.setitem(backbone.MODEL_ALIASES, "mini", tmp_path)
    with pytest.raises(BackboneError, match=f"alias for {tmp_path}.*no checkpoint"):
        load_backbone("mini")


def test_mini_is_only_an_alias_for_a_plain_hugging_face_folder():
    """The shipped folder loads with the stock Auto* classes, and by path it is the same model."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from yollava.backbone import MODEL_ALIASES

    path = MODEL_ALIASES["mini"]
    assert AutoConfig.from_pretrained(path).architectures == ["LlavaForConditionalGeneration"]
    tok = AutoTokenizer.from_pretrained(path)
    ref = build_mini_tokenizer()
    for text in ["is there a red striped circle in this photo?", "USER: <image>\nyes, <pip> is here. </s>"]:
        assert tok(text, split_special_tokens=True)["input_ids"] == ref(text, split_special_tokens=True)["input_ids"]
    assert AutoImageProcessor.from_pretrained(path).do_resize is False
    by_alias, by_path = load_backbone("mini"), load_backbone(str(path))
    assert by_alias.model_id == "mini" and by_alias.fingerprint == by_path.fingerprint


def test_pretraining_step_lowers_every_loss():
    import torch

    from miniworld.pretrain import MiniPretrainer

    torch.manual_seed(0)
    pt = MiniPretrainer(seed=0)
    rng = random.Random(0)
    batch = [tasks.sample_task(rng) for _ in range(8)]
    opt = torch.optim.AdamW(pt.parameters(), lr=2e-3)
    first = {k: float(v) for k, v in pt.loss(batch).items()}
    for _ in range(15):
        losses = pt.loss(batch)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    last = {k: float(v) for k, v in pt.loss(batch).items()}
    assert all(last[k] < first[k] for k in first), (first, last)


def test_every_task_kind_terminates_on_crowded_scenes():
    """A scene holding all four shapes has no absent shape: existence must still answer."""
    rng = random.Random(7)
    for _ in range(3000):
        tasks.existence(rng)
    for kind, make in tasks.MAKERS.items():
        for _ in range(200):
            make(rng)


# ---------------------------------------------------------------- sample subjects


def _cells(path) -> list[np.ndarray]:
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB"))
    return [img[r * world.CELL:(r + 1) * world.CELL, c * world.CELL:(c + 1) * world.CELL]
            for r in range(world.GRID) for c in range(world.GRID)]


def _holds(path, obj) -> bool:
    cell = world.draw(obj)
    return any(np.array_equal(c, cell) for c in _cells(path))


def test_committed_sample_subjects_are_what_the_generator_writes():
    from miniworld.subjects import DEFAULT_OUT, differences

    assert differences(DEFAULT_OUT) == []


def test_sample_subject_labels_are_right_by_construction():
    """Read back from the pixels: each subject is in its own photos and nowhere else;
    its hard negatives hold its twin (the notch differs) and not the subject."""
    from yollava.data import YollavaDataset
    from miniworld.subjects import DEFAULT_OUT, sample_subjects

    ds = YollavaDataset.load(DEFAULT_OUT)
    subjects = sample_subjects()
    assert {s.name for s in subjects} == set(ds.subjects) and len({s.owner for s in subjects}) == 2
    pool = sorted((DEFAULT_OUT / "pool").glob("*.png"))
    for s in subjects:
        own = ds.subjects[s.name]
        assert 5 <= len(own.train_images) <= 10 and len(own.test_images) >= 5
        assert all(_holds(p, s.obj) for p in own.train_images + own.test_images)
        hard = own.test_negatives["hard"]
        assert hard and all(_holds(p, s.twin) and not _holds(p, s.obj) for p in hard)
        assert tasks.in_words(s.twin) == tasks.in_words(s.obj) and s.twin != s.obj
        others = [p for o in subjects if o != s for p in ds.subjects[o.name].test_images]
        assert not any(_holds(p, s.obj) for p in others + pool[::10])


def test_new_tasks_answer_truthfully():
    rng = random.Random(1)
    for _ in range(100):
        t = tasks.single_check(rng)
        o = t.scene.objects()[0]
        word = t.messages[0].text.removeprefix("is the object ").removeprefix("a ").rstrip("?")
        assert (word in (o.colour, o.shape, o.pattern)) == (t.correct == 0)
        t = tasks.naming_text(rng)
        desc = t.messages[0].text.removeprefix("<sks> is ").rstrip(".")
        assert any(tasks.in_words(x) == desc for x in t.scene.objects()) == (t.correct == 0)
        t = tasks.naming(rng, by_example=True, negative="notch")
        target = t.definition.examples[0][0].cells[t.definition.examples[0][1]]
        if t.correct == 1:
            assert target not in t.scene.objects()
            assert any(tasks.in_words(x) == tasks.in_words(target) for x in t.scene.objects())


def test_binding_names_every_object_once_by_its_key_in_a_random_order():
    """`circle red, square blue.`: every object of the scene once, keyed by an attribute no other
    object shares, paired with its own asked attribute; the order is not the cells' (else the
    position would stand in for the key)."""
    rng = random.Random(3)
    in_cell_order = 0
    for _ in range(300):
        t = tasks.binding(rng)
        asked = t.messages[0].text.split()[2]
        key = tasks.BINDING_KEY[asked]
        objs = t.scene.objects()
        pairs = [p.split() for p in t.messages[1].text.rstrip(".").split(", ")]
        assert sorted(k for k, _ in pairs) == sorted(getattr(o, key) for o in objs)  # each once, keys unique
        assert len({k for k, _ in pairs}) == len(objs) >= 2
        by_key = {getattr(o, key): getattr(o, asked) for o in objs}
        assert all(by_key[k] == v for k, v in pairs)
        in_cell_order += [k for k, _ in pairs] == [getattr(o, key) for o in objs]
    assert in_cell_order < 150


# ---------------------------------------------------------------- the shipped model


def _shipped_weights():
    from miniworld.model import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.fail(f"the miniature model's weights are missing from {WEIGHTS}")
    return WEIGHTS


def _card_figures(card: str) -> dict[str, float]:
    """The held-out table of the card: `| probe | accuracy | question |` rows."""
    import re

    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^\| (\w+) \| ([01]\.\d{3}) \|", card, re.M)}


def test_shipped_weights_are_small_and_carded():
    w = _shipped_weights()
    assert (w / "model.safetensors").stat().st_size <= 25 * 2 ** 20
    figures = _card_figures((w / "README.md").read_text())
    assert {"existence", "attribute", "naming_example", "naming_notch"} <= set(figures), figures


@pytest.mark.slow
def test_shipped_weights_reproduce_the_card():
    """Measure the probes again on the shipped weights; the card's figures must be what comes out."""
    from miniworld.pretrain import load_pretrainer

    w = _shipped_weights()
    card = _card_figures((w / "README.md").read_text())
    kinds = ("existence", "attribute", "naming_example")
    got = load_pretrainer(w).probe(kinds, n=400)
    for k in kinds:
        assert abs(got[k] - card[k]) <= 0.02, (k, got[k], card[k])


@pytest.mark.slow
def test_personalizing_a_sample_subject_beats_vanilla():
    """End to end on the shipped model: photos -> negatives mined -> concept trained ->
    held-out recognition (the evaluation harness) well above the name alone, the twin
    (the same words, another notch) rejected where a description in words cannot, and the
    name said back in generated answers."""

    from miniworld.reproduce import MINI_RECIPE
    from miniworld.subjects import DEFAULT_OUT, load_meta
    from yollava.data import YollavaDataset, load_image
    from yollava.evaluate import Evaluator, Prompting
    from yollava.generate import GenerationRequest, SamplingParams
    from yollava.pipeline import SubjectSpec, train_concepts
    from yollava.prompt import Message
    from yollava.pool import build_pool

    _shipped_weights()
    backbone = load_backbone("mini")
    ds = YollavaDataset.load(DEFAULT_OUT)
    name = "zola"
    described = {s["name"]: s["description"] + "." for s in load_meta(DEFAULT_OUT)["subjects"]}
    spec = SubjectSpec(name, [str(p) for p in ds.subjects[name].train_images], owner="ana")
    pool = build_pool(str(DEFAULT_OUT / "pool"), backbone, "vision-tower")
    rows = train_concepts(backbone, [spec], load_image, pool, MINI_RECIPE, progress=False)[name].rows
    ev = Evaluator(backbone, ds, {name: rows}, progress=False, descriptions=described)
    vanilla = ev.recognition(Prompting([], [], []), name)["likelihood"]["weighted_accuracy"]
    concept = ev.recognition(ev.prompting("concept", name), name)
    words = ev.recognition(ev.prompting("description", name), name)
    weighted, twin = concept["likelihood"]["weighted_accuracy"], concept["negative_by_kind"]["hard"]
    # measured on the shipped base (the binding base, ADR 004 §15; rows start at the subject's own cell):
    # make reproduce, seeds 0/1: zola 0.94/0.88 weighted, twin rejected 1.0/1.0; this test's run 0.942,
    # twin 1.0, generated answers 0.942, the bare name 0.59; its description rejects the twin 0.0.
    # On stage 4: 0.983 (0.967 before the init fix); on stage 3: 0.83 weighted, twin 0.6
    print(f"zola: concept {weighted:.3f} (twin {twin:.2f}), vanilla {vanilla:.3f}, "
          f"description twin {words['negative_by_kind']['hard']:.2f}")
    assert weighted >= 0.9 and weighted >= vanilla + 0.3, (weighted, vanilla)
    assert twin >= 0.9 and twin >= words["negative_by_kind"]["hard"] + 0.7, (twin, words["negative_by_kind"])
    # generation: the concept's output row learned to say the name (with one learning rate for all
    # rows the kept epoch's answers were "yes, that is i no, that is not no, ...")
    q = f"Is <{name}> in this photo? Answer with yes or no."
    texts = [ev.generator.generate([GenerationRequest([Message("user", q, images=1)], [rows], [load_image(p)],
                                                      SamplingParams(max_new_tokens=16))])[0].text
             for p in ds.subjects[name].test_images[:3]]
    print(texts)
    assert all(t.split(",")[0] in ("yes", "no") and f"<{name}>" in t for t in texts), texts
    ev.generate = True  # every test photo answered in words, as `miniworld.dev --generate` reports
    generated = ev.recognition(ev.prompting("concept", name), name)["generated"]
    print(generated)
    assert generated["names_said"] >= 0.9 and generated["weighted_accuracy"] >= 0.9, generated


@pytest.mark.slow
def test_reproduce_writes_the_table_plot_and_figures(tmp_path):
    from dataclasses import replace

    from miniworld.reproduce import MINI_RECIPE, reproduce
    from miniworld.subjects import DEFAULT_OUT

    _shipped_weights()
    small = replace(MINI_RECIPE, epochs=1, hard_negatives=4, easy_negatives=4, attribute_questions=2)
    report = reproduce(load_backbone("mini"), DEFAULT_OUT, tmp_path, seeds=[0], ks=[16],
                       recipes={"yollava": small, "no_hard_negatives": replace(small, hard_negatives=0,
                                                                               easy_negatives=8)},
                       progress=False)
    assert set(report["summary"]) == {"vanilla", "description", "yollava", "no_hard_negatives"}
    for method, agg in report["summary"].items():
        assert agg["n"] == 6, method
        assert {"pos", "neg", "weighted", "neg_hard", "neg_easy", "text_qa"} <= set(agg), method
        assert abs(agg["weighted"] - (agg["pos"] + agg["neg"]) / 2) < 1e-9
    assert (tmp_path / "recognition.png").stat().st_size > 1000
    assert "| yollava |" in (tmp_path / "results.md").read_text()


def test_the_mini_recipe_has_one_source(tmp_path):
    """The reproduction, the demo's request and the example request all read examples/mini-recipe.yaml."""
    from cluster.request import load_request
    from miniworld.reproduce import MINI_RECIPE, RECIPE_FILE
    from serve import demo
    from yollava.recipe import RecipeConfig

    assert MINI_RECIPE == RecipeConfig.from_file(RECIPE_FILE) and demo.RECIPE_FILE == RECIPE_FILE
    assert MINI_RECIPE.flip is False  # a flip moves the notch: the twin would become a positive
    # the recipe as it is: with half its epochs the kept rows could not yet say the name
    assert load_request(str(demo.write_request(tmp_path, "mini"))).recipe_config() == MINI_RECIPE
    example = Path(__file__).resolve().parents[1] / "examples" / "request.yaml"
    assert load_request(str(example)).recipe_config() == MINI_RECIPE


def test_a_larger_pool_keeps_the_subjects_and_lookalikes_are_the_other_notches(tmp_path):
    from miniworld import dev
    from miniworld.subjects import POOL, lookalikes, scenes

    subjects, small = scenes(7)
    same, big = scenes(7, POOL + 200)
    assert same == subjects and len(big) == len(small) + 200
    assert all(big[p] == sc for p, sc in small.items())  # train, test and the first pool scenes unchanged
    for s in subjects:
        alike = lookalikes(s, big)
        assert alike == sorted(alike) and set(alike) >= set(lookalikes(s, small))
        for p in alike:
            held = [o for o in big[p].objects() if (o.shape, o.colour, o.pattern) == (s.obj.shape, s.obj.colour,
                                                                                      s.obj.pattern)]
            assert p.startswith("pool/") and held and all(o.notch not in (s.obj.notch, s.twin.notch) for o in held)
        missed = [p for p in big if p.startswith("pool/") and p not in alike
                  and world.Obj(s.obj.shape, s.obj.colour, s.obj.pattern, (s.obj.notch + 2) % 4) in big[p].objects()]
        assert missed == []
    data = dev.dev_subjects(7, tmp_path, pool=12)
    assert data.name == "seed7-pool12" and len(list((data / "pool").glob("*.png"))) == 12
    got = dev.world_lookalikes(7, 12, data)
    assert all(p.startswith(str(data / "pool")) and Path(p).is_file() for v in got.values() for p in v)
    with pytest.raises(SystemExit):
        dev.main(["--pool", "0"])


def test_count_mined_checks_the_mined_negatives_against_the_world(tmp_path):
    """Mining the whole pool finds every look-alike; mining fewer finds at most that many."""
    from dataclasses import replace

    from miniworld import dev
    from miniworld.reproduce import MINI_RECIPE

    backbone = load_backbone("mini")
    data = dev.dev_subjects(7, tmp_path, pool=40)
    exist = {n: len(v) for n, v in dev.world_lookalikes(7, 40, data).items()}
    assert sum(exist.values()) > 0
    every = dev.count_mined(backbone, data, 7, 40, replace(MINI_RECIPE, hard_negatives=40))
    assert every == {n: [e, 40, e] for n, e in exist.items()}
    some = dev.count_mined(backbone, data, 7, 40, replace(MINI_RECIPE, hard_negatives=5))
    assert all(n == 5 and k <= min(5, e) and e == exist[name] for name, (k, n, e) in some.items())


def test_dev_script_refuses_the_sample_subjects_and_types_overrides():
    from miniworld import dev
    from miniworld.reproduce import MINI_RECIPE

    with pytest.raises(SystemExit):
        dev.main(["--subject-seeds", "7,2024"])
    r = dev.override(MINI_RECIPE, ["lr=0.01", "epochs=3", "flip=false"])
    assert (r.lr, r.epochs, r.flip) == (0.01, 3, False)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        dev.override(MINI_RECIPE, ["learning_rate=1"])


def test_hidden_rows_are_frozen_distinct_word_scale_and_unreachable(tmp_path):
    """The notch's latent rows: a frozen buffer (no optimiser step moves them), orthogonal, at the words'
    scale; shipped as embedding rows after the tokenizer's last id, which no string encodes to."""
    import torch

    from miniworld.pretrain import MiniPretrainer, load_pretrainer, save

    pt = MiniPretrainer(seed=0)
    H = pt.hidden_rows.clone()
    assert not any(p is pt.hidden_rows for p in pt.parameters())
    gram = H @ H.T  # (4, 4)
    assert torch.allclose(gram - torch.diag(gram.diag()), torch.zeros(4, 4), atol=1e-5)
    words = pt.backbone.embed_tokens.weight.detach().norm(dim=-1).mean()
    assert torch.allclose(H.norm(dim=-1), words.expand(4), rtol=1e-4)
    opt = torch.optim.AdamW(pt.parameters(), lr=1e-2)
    loss = pt.loss([tasks.notch_check(random.Random(i)) for i in range(4)])
    sum(loss.values()).backward()
    opt.step()
    assert torch.equal(pt.hidden_rows, H)
    save(pt, tmp_path, {"probe": {}})
    bb = load_backbone(str(tmp_path))
    V = len(bb.tokenizer)
    assert bb.vocab_size == V + 4 and torch.equal(bb.embed_tokens.weight[V:], H)
    assert not bb.lm_head.weight[V:].any()
    assert max(bb.tokenizer.get_vocab().values()) < V  # no string reaches them
    assert torch.equal(load_pretrainer(tmp_path).hidden_rows, H)


def test_soft_definitions_are_the_same_wherever_built():
    """Fillers and noise are drawn from the task's own seed: a probe is the same question every time."""
    import torch

    from miniworld.pretrain import MiniPretrainer

    pt = MiniPretrainer(seed=0)
    built = 0
    for i in range(40):
        a, b = (tasks.naming_soft(random.Random(i), forms=("hidden", "sum")) for _ in range(2))
        ra, rb = pt._rows(a.definition, iter([])), pt._rows(b.definition, iter([]))
        assert torch.equal(ra.embed, rb.embed)
        built += bool(a.definition.fillers or a.definition.noise)
    assert built > 10  # the random parts were exercised


def test_notch_check_answers_truthfully():
    rng = random.Random(3)
    for _ in range(200):
        t = tasks.notch_check(rng)
        (o,) = t.scene.objects()
        assert t.definition.form == "hidden" and t.definition.words == "a object"
        assert (t.definition.obj.notch == o.notch) == (t.correct == 0)


def test_the_card_lists_every_stage_with_the_steps_it_ran():
    """A stage stopped early (`--stop-at`) says the steps it ran, first stage or last, and each
    earlier stage's command saves where the next one starts from."""
    from miniworld.pretrain import command, provenance

    first = {"steps": 6000, "stop_at": 4000, "batch": 32, "lr": 3e-4, "seed": 0, "gated": True, "probe_every": 250}
    last = {"steps": 5000, "stop_at": 2750, "batch": 32, "lr": 1e-4, "seed": 3, "gated": True, "probe_every": 250,
            "curriculum": "naming", "minutes": 41.8,
            "init": {"from": "runs/mini-stage1", "command": command(first), "steps": 4000, "minutes": 45.6}}
    text = provenance(last)
    one, two = text.split("\n\n2. ")
    assert "(4000 steps, 45.6 min" in one and "--stop-at 4000" in one and one.endswith("--out runs/mini-stage1")
    assert "(2750 steps, 41.8 min" in two and "--steps 5000" in two and "--stop-at 2750" in two
    assert "--init runs/mini-stage1 --curriculum naming" in two


@pytest.mark.slow
def test_the_attribute_answers_concepts_learn_from_are_the_subjects():
    """Text-only training learns the base's answers about the subject's photos. On crowded scenes the
    base answers about any object, so one look per question (the paper's) is often about another;
    the mini recipe's most common answer over the photos is the subject's, because the subject is
    the one object every photo shares."""
    from dataclasses import replace

    from miniworld.reproduce import MINI_RECIPE
    from miniworld.subjects import DEFAULT_OUT, load_meta
    from yollava.data import YollavaDataset, load_image
    from yollava.generate import Generator
    from yollava.pipeline import ask_attributes

    _shipped_weights()
    gen = Generator(load_backbone("mini"))
    ds = YollavaDataset.load(DEFAULT_OUT)
    cfg = replace(MINI_RECIPE, attribute_questions=3)  # colour, shape, pattern
    right = {1: 0, MINI_RECIPE.attribute_votes: 0}
    for s in load_meta(DEFAULT_OUT)["subjects"]:
        photos = [load_image(p) for p in ds.subjects[s["name"]].train_images]
        truth = [s["object"][k] for k in ("colour", "shape", "pattern")]
        for votes in right:
            answers = [a for _, a in ask_attributes(gen, photos, replace(cfg, attribute_votes=votes))]
            right[votes] += sum(t in a.split() or f"{t}." in a.split() for t, a in zip(truth, answers))
    # measured on the shipped base (the binding base, ADR 004 §15): one look 9 of 18, 8 votes 15 of 18
    # (stage 4: 8 and 17)
    print(right)
    assert right[MINI_RECIPE.attribute_votes] >= 14 and right[MINI_RECIPE.attribute_votes] >= right[1] + 5, right
