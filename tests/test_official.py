"""Concepts in the official Yo'LLaVA format: imported into a store, exported back, same model outputs.

The files are written here exactly as the official `train.py` writes them (a
resized float16 model, `torch.save(model.get_input_embeddings().weight.data[ids])`
and the same for `lm_head`), and loaded back exactly as its `test-sks.py`
does, on the LLaVA-1.5-shaped checkpoint with the real tokenizer.
"""

import copy
import json
import os

import pytest
import torch

from cluster.official import main
from cluster.store import open_store
from tests.conftest import random_photo, random_rows
from tests.real_vocab import llava15_backbone, llava15_folder
from yollava.artifacts import ConceptArtifact
from yollava.concept_model import ConceptLM, ConceptTable
from yollava.official import OfficialFormatError, official_token_names, read_official
from yollava.prompt import SYSTEM_PROMPT, Message, PromptEncoder

K = 4


@pytest.fixture(scope="module")
def bb():
    return llava15_backbone()


def resized_official(bb, sks: str, k: int, dtype=torch.float32):
    """The official scripts' model: `<sks>`, `<token0>`… added, embeddings resized to len(tokenizer)."""
    tok = copy.deepcopy(bb.tokenizer)
    names = official_token_names(sks, k)
    tok.add_tokens(names)
    model = copy.deepcopy(bb.model).to(dtype)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    return model, tok, tok.convert_tokens_to_ids(names)


def write_like_official_train(bb, folder, epoch, sks="sks", k=K, seed=0):
    """What train.py leaves after an epoch: float16 rows of the placeholder tokens, one torch.save each."""
    model, _, placeholder_token_ids = resized_official(bb, sks, k, torch.float16)
    g = torch.Generator().manual_seed(seed)
    d = bb.hidden_size
    with torch.no_grad():  # stand-ins for trained rows, at the scale of the base rows (x3)
        model.get_input_embeddings().weight[placeholder_token_ids] = \
            (torch.randn(k + 1, d, generator=g) * bb.embed_tokens.weight.std() * 3).half()
        model.lm_head.weight[placeholder_token_ids] = \
            (torch.randn(k + 1, d, generator=g) * bb.lm_head.weight.std() * 3).half()
    save_location = str(folder)
    os.makedirs(save_location, exist_ok=True)
    save_path_token = os.path.join(save_location, f'{epoch}-token.pt')
    save_path_lmhead = os.path.join(save_location, f'{epoch}-lmhead.pt')
    torch.save(model.get_input_embeddings().weight.data[placeholder_token_ids], save_path_token)
    torch.save(model.lm_head.weight.data[placeholder_token_ids], save_path_lmhead)
    return save_path_token, save_path_lmhead


def load_like_official_test(bb, token_pt, lmhead_pt, sks, k):
    """test-sks.py: resize, torch.load the two files, write them into the placeholder rows."""
    model, tok, placeholder_token_ids = resized_official(bb, sks, k)
    sks_token = torch.load(token_pt, weights_only=True).detach()
    lm_head = torch.load(lmhead_pt, map_location=model.lm_head.weight.device, weights_only=True).detach()
    with torch.no_grad():
        model.get_input_embeddings().weight[placeholder_token_ids] = \
            sks_token.to(dtype=model.get_input_embeddings().weight.dtype)
        model.lm_head.weight[placeholder_token_ids] = lm_head.detach().to(dtype=model.lm_head.weight.dtype)
    return model.eval(), tok, placeholder_token_ids


def logits_ours_vs_official(bb, rows, ref_model, ref_tok, ref_ids, sks):
    """Max |difference| of the logits of one prompt with a photo: virtual ids vs the official model."""
    enc = PromptEncoder.for_backbone(bb).encode([Message("user", f"Is <{rows.tokens.name}> in this photo?", 1)],
                                                [rows.tokens])
    names = official_token_names(sks, rows.tokens.num_latent)
    text = (f"{SYSTEM_PROMPT} USER: " + "<image>" * bb.num_image_tokens + "\n"
            + f"{names[0]} is {''.join(names[1:])}.\n" + f"Is {names[0]} in this photo? ASSISTANT:")
    rids = [ref_tok.bos_token_id] + ref_tok(text, add_special_tokens=False)["input_ids"]
    V = bb.vocab_size
    assert [i if i < V else ref_ids[i - V] for i in enc.ids] == rids
    pv = bb.preprocess([random_photo(8)])
    ids = torch.tensor([enc.ids])
    table = ConceptTable.build([[rows]], bb.hidden_size, bb.dtype, "cpu")
    with torch.no_grad():
        ours = ConceptLM(bb)(ids, torch.ones_like(ids), table, bb.image_features(pv), torch.tensor([enc.image_mask]))
        theirs = ref_model(input_ids=torch.tensor([rids]), pixel_values=pv).logits
    n = len(bb.tokenizer)
    mine = list(range(n)) + list(range(V, V + rows.tokens.num_tokens))
    cols = list(range(n)) + list(ref_ids)
    return (ours[0][:, mine] - theirs[0][:, cols]).abs().max().item()


def test_import_official_pair_into_a_store(bb, tmp_path, capsys):
    token_pt, lmhead_pt = write_like_official_train(bb, tmp_path / "checkpoints" / "sks" / "multi-token", 3)
    store_uri = (tmp_path / "store").as_uri()
    rc = main(["import", "--from", str(tmp_path / "checkpoints" / "sks" / "multi-token"), "--epoch", "3",
               "--model", str(llava15_folder()), "--owner", "alice", "--name", "bo", "--sks-name", "sks",
               "--store", store_uri])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["concept"], report["version"], report["num_latent"], report["d"]) == ("alice/bo", 1, K, 64)
    art = open_store(store_uri).get_concept("alice", "bo", expect_fingerprint=bb.fingerprint)
    official = torch.load(token_pt, weights_only=True), torch.load(lmhead_pt, weights_only=True)
    assert official[0].dtype == torch.float16 and official[0].shape == (K + 1, 64)
    assert torch.equal(art.rows.embed, official[0].float()) and torch.equal(art.rows.head, official[1].float())
    assert art.rows.tokens.strings == ["<bo>", "<bo_1>", "<bo_2>", "<bo_3>", "<bo_4>"]
    src = art.source
    assert (src["format"], src["token_file"], src["lmhead_file"], src["dtype"], src["sks_name"]) == \
        ("yollava-official", "3-token.pt", "3-lmhead.pt", "float16", "sks")
    import hashlib
    assert src["token_sha256"] == hashlib.sha256(open(token_pt, "rb").read()).hexdigest()
    assert art.base_fingerprint == bb.fingerprint
    # the stored concept behaves as the official model with those files loaded (test-sks.py)
    ref_model, ref_tok, ref_ids = load_like_official_test(bb, token_pt, lmhead_pt, "sks", K)
    assert logits_ours_vs_official(bb, art.rows, ref_model, ref_tok, ref_ids, "sks") <= 1e-5
    # a second import is the next version
    assert main(["import", "--token", str(token_pt), "--lmhead", str(lmhead_pt), "--model", str(llava15_folder()),
                 "--owner", "alice", "--name", "bo", "--store", str(tmp_path / "store")]) == 0
    assert open_store(store_uri).versions("alice", "bo") == [1, 2]


def test_export_for_the_official_scripts(bb, tmp_path, capsys):
    rows = random_rows(bb, "bo", k=K, seed=4, scale=3)
    store = open_store((tmp_path / "store").as_uri())
    store.put_concept(ConceptArtifact("alice", rows, "llava-1.5-tiny", bb.fingerprint))
    out = tmp_path / "checkpoints" / "bo" / "multi-token"
    assert main(["export", "--store", store.uri, "--owner", "alice", "--name", "bo", "--out", str(out),
                 "--epoch", "7"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["official_test"] == "--sks_name bo --prefix_token 4 --epoch 7"
    token_pt, lmhead_pt = out / "7-token.pt", out / "7-lmhead.pt"
    for path, want in ((token_pt, rows.embed), (lmhead_pt, rows.head)):
        t = torch.load(path, weights_only=True)
        assert type(t) is torch.Tensor and t.dtype == torch.float32 and torch.equal(t, want)
        assert path.stat().st_size < want.numel() * 4 + 4096  # the rows alone, not a larger storage
    # the official test script, loading these files, computes what the platform computes
    ref_model, ref_tok, ref_ids = load_like_official_test(bb, token_pt, lmhead_pt, "bo", K)
    assert logits_ours_vs_official(bb, rows, ref_model, ref_tok, ref_ids, "bo") <= 1e-5


def test_import_then_export_gives_the_official_files_back(bb, tmp_path):
    token_pt, lmhead_pt = write_like_official_train(bb, tmp_path / "in", "best", seed=2)
    store = str(tmp_path / "store")
    assert main(["import", "--from", str(tmp_path / "in"), "--model", str(llava15_folder()), "--owner", "bob",
                 "--name", "mug", "--store", store]) == 0
    assert main(["export", "--store", store, "--owner", "bob", "--name", "mug", "--out", str(tmp_path / "out"),
                 "--dtype", "float16"]) == 0
    for a, b in ((token_pt, tmp_path / "out" / "best-token.pt"), (lmhead_pt, tmp_path / "out" / "best-lmhead.pt")):
        x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert y.dtype == torch.float16 and torch.equal(x, y)


def test_export_from_a_trained_concept_folder(bb, tmp_path):
    from yollava.artifacts import save_concept

    rows = random_rows(bb, "pip", k=2, seed=1)
    folder = save_concept(tmp_path / "concepts" / "pip", ConceptArtifact("local", rows, "m", bb.fingerprint))
    assert main(["export", "--concept", str(folder), "--out", str(tmp_path / "out")]) == 0
    assert torch.equal(torch.load(tmp_path / "out" / "best-lmhead.pt", weights_only=True), rows.head)


class Planted:
    """Unpickling this would create a file: torch.load(weights_only=True) must never do it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("content,match", [
    (lambda d, tmp: {"embed": torch.zeros(5, d)}, "holds a dict, expected a plain tensor"),
    (lambda d, tmp: [torch.zeros(5, d)], "holds a list, expected a plain tensor"),
    (lambda d, tmp: Planted(str(tmp / "planted")), "not a tensor file torch.load\\(weights_only=True\\) may read"),
    (lambda d, tmp: torch.zeros(5, d, dtype=torch.int64), "dtype torch.int64, expected a floating-point"),
    (lambda d, tmp: torch.zeros(d), r"shape \[64\], expected \[k\+1, d\]"),
    (lambda d, tmp: torch.zeros(1, d), r"shape \[1, 64\], expected \[k\+1, d\] with k >= 1"),
    (lambda d, tmp: torch.full((5, d), float("nan")), "non-finite"),
    (lambda d, tmp: torch.zeros(5, 32), "width d=32; the base model's hidden size is 64"),
])
def test_anything_but_plain_tensors_of_the_right_shape_is_refused(tmp_path, content, match):
    d = 64
    token = tmp_path / "0-token.pt"
    torch.save(content(d, tmp_path), token)
    torch.save(torch.zeros(5, d) if "width" not in match else torch.zeros(5, 32), tmp_path / "0-lmhead.pt")
    with pytest.raises(OfficialFormatError, match=match) as e:
        read_official(token, tmp_path / "0-lmhead.pt", hidden_size=d)
    assert "0-token.pt" in str(e.value)
    assert not (tmp_path / "planted").exists()  # nothing in the file ran


def test_refusals_through_the_command(bb, tmp_path, capsys):
    torch.save(torch.zeros(5, 64), tmp_path / "1-token.pt")
    torch.save(torch.zeros(3, 64), tmp_path / "1-lmhead.pt")
    store = tmp_path / "store"
    args = ["import", "--from", str(tmp_path), "--epoch", "1", "--model", str(llava15_folder()), "--owner", "alice",
            "--name", "bo", "--store", str(store)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "1-token.pt has shape [5, 64] but" in err and "1-lmhead.pt has [3, 64]" in err
    assert not store.exists() or open_store(str(store)).list_concepts() == []
    assert main(args[:2] + [str(tmp_path), "--epoch", "latest"] + args[5:]) == 2
    assert "epoch='latest' must be a number or 'best'" in capsys.readouterr().err
    torch.save(torch.zeros(5, 48), tmp_path / "2-token.pt")
    torch.save(torch.zeros(5, 48), tmp_path / "2-lmhead.pt")
    assert main(args[:4] + ["2"] + args[5:]) == 2
    assert "d=48; the base model's hidden size is 64" in capsys.readouterr().err
    assert main(["import", "--from", str(tmp_path), "--epoch", "2", "--model", "tiny", "--owner", "../x",
                 "--name", "bo", "--store", str(store)]) == 2
    assert "owner='../x'" in capsys.readouterr().err
