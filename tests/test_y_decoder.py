"""YDecoder (causal LM on a Y-space prefix), its training loop, and the two decoders of eval.decode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from eval.decode import CaptionBank, GenerativeDecoder, decoder_for
from predictors.y_decoder import YDecoder, fit_y_decoder

CAPTIONS = [
    "a dog runs on the grass",
    "two men ride bikes down a hill",
    "a girl eats ice cream",
    "a black cat sleeps",
    "children play football in the park",
    "a man surfs a big wave",
    "a red car",
    "an old woman reads a book by the window",
]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add overhead (and stall badly on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_decoder(vocab_size: int = 50, y_dim: int = 16, **kwargs) -> YDecoder:
    torch.manual_seed(0)
    options = dict(dim=32, depth=2, num_heads=2, max_len=16, prefix_len=2, bos_id=1, eos_id=2, pad_id=0)
    options.update(kwargs)
    return YDecoder(y_dim, vocab_size, **options)


class WordTokenizer:
    """A word-level vocabulary of the test captions: [PAD] 0, [BOS] 1, [EOS] 2, then the words."""

    def __init__(self, texts: list[str]):
        self.words = ["[PAD]", "[BOS]", "[EOS]"] + sorted({word for text in texts for word in text.split()})
        self.index = {word: i for i, word in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """texts -> input_ids, attention_mask (N, longest + 2), [BOS] ... [EOS] then [PAD] on the right."""
        rows = [[1] + [self.index[word] for word in text.split()] + [2] for text in texts]
        width = max(map(len, rows))
        ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
        return ids, (ids != 0).long()

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids)


def test_overfits_eight_captions_and_generates_them():
    tokenizer = WordTokenizer(CAPTIONS)
    ids, mask = tokenizer(CAPTIONS)
    embeddings = F.normalize(torch.randn(len(CAPTIONS), 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    decoder = tiny_decoder(vocab_size=len(tokenizer), max_len=ids.shape[1] + 2)
    losses = fit_y_decoder(decoder, embeddings, ids, mask, epochs=150, lr=1e-2, batch_size=4, device="cpu",
                           seed=0, warmup_steps=10)
    assert len(losses) == 150 and losses[-1] < 0.05 < 2.0 < losses[0]

    generated = decoder.generate(embeddings)
    assert generated.shape == ids.shape  # stops once the longest caption's eos is out
    assert torch.equal(generated, ids)  # exact tokens, eos, then pad on the shorter rows

    assert GenerativeDecoder(decoder, tokenizer).decode(embeddings) == CAPTIONS
    assert decoder_for("generative", decoder=decoder, tokenizer=tokenizer).decode(embeddings[3]) == [CAPTIONS[3]]


class ScriptedDecoder(YDecoder):
    """Emits script[b][L - 1] after L tokens of row b (a greedy argmax made to follow a fixed script)."""

    def __init__(self, script: list[list[int]], vocab_size: int = 10, bos_id: int = 1, eos_id: int = 2):
        super().__init__(4, vocab_size, dim=8, depth=1, num_heads=1, max_len=len(script[0]) + 1, prefix_len=1,
                         bos_id=bos_id, eos_id=eos_id, pad_id=0)
        self.script = torch.tensor(script)
        self.calls = 0

    def forward(self, embedding, input_ids):
        self.calls += 1
        length = input_ids.shape[1]
        logits = torch.zeros(input_ids.shape[0], length, self.vocab_size)
        logits[torch.arange(input_ids.shape[0]), -1, self.script[:, length - 1]] = 1.0
        return logits


def test_generate_stops_at_eos_and_pads():
    decoder = ScriptedDecoder([[5, 2, 7, 7, 7, 7, 7], [6, 6, 2, 7, 7, 7, 7]])
    out = decoder.generate(torch.zeros(2, 4))
    # row 0 finishes at step 2 and is padded (its scripted 7 after eos is replaced by pad); the loop ends at step 3
    assert out.tolist() == [[1, 5, 2, 0], [1, 6, 6, 2]]
    assert decoder.calls == 3  # one batched forward per time step

    never_ends = ScriptedDecoder([[5] * 7, [6] * 7])
    assert never_ends.generate(torch.zeros(2, 4), max_len=3).tolist() == [[1, 5, 5], [1, 6, 6]]
    assert never_ends.generate(torch.zeros(2, 4)).shape == (2, 8)  # cut at the model's max_len
    with pytest.raises(ValueError, match="max_len=9"):
        never_ends.generate(torch.zeros(2, 4), max_len=9)


def test_generative_decoder_with_the_minilm_tokenizer():
    transformers = pytest.importorskip("transformers")
    from encoders.text import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_path()))
    texts = ["a dog runs on the grass.", "two men"]
    ids = tokenizer(texts, padding=True)["input_ids"]  # [CLS] 101 ... [SEP] 102, then [PAD] 0
    assert ids[0][0] == 101 and ids[1][3:] == [102] + [0] * (len(ids[0]) - 4)
    # the scripted decoder emits each caption after [CLS]; after [SEP] it would emit 7 (replaced by pad)
    script = [row[1:] + [7] for row in ids]
    decoder = ScriptedDecoder([[i if i else 7 for i in row] for row in script], vocab_size=len(tokenizer),
                              bos_id=101, eos_id=102)
    assert torch.equal(decoder.generate(torch.zeros(2, 4)), torch.tensor(ids))
    assert GenerativeDecoder(decoder, tokenizer).decode(torch.ones(2, 4)) == texts


def test_causal_and_conditioned_on_the_embedding():
    decoder = tiny_decoder().eval()
    gen = torch.Generator().manual_seed(0)
    embedding = F.normalize(torch.randn(3, 16, generator=gen), dim=-1)
    ids = torch.randint(3, 50, (3, 10), generator=gen)
    logits = decoder(embedding, ids)
    assert logits.shape == (3, 10, 50)
    for t in (0, 4, 8):
        changed = ids.clone()
        changed[:, t + 1:] = torch.randint(3, 50, (3, 10 - t - 1), generator=gen)
        other = decoder(embedding, changed)
        torch.testing.assert_close(other[:, :t + 1], logits[:, :t + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(other[:, t + 1:], logits[:, t + 1:], atol=1e-4)
    assert not torch.allclose(decoder(embedding.flip(0), ids), logits, atol=1e-4)
    assert decoder.head.weight is decoder.token_embed.weight


def test_loss_is_cross_entropy_on_real_tokens_only():
    decoder = tiny_decoder().eval()
    gen = torch.Generator().manual_seed(3)
    embedding = F.normalize(torch.randn(2, 16, generator=gen), dim=-1)
    lengths = [7, 4]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.cat([torch.tensor([1]), torch.randint(3, 50, (length - 2,), generator=gen),
                                       torch.tensor([2])])
        mask[row, :length] = 1
    loss = decoder.loss(embedding, ids, mask)

    logits = decoder(embedding, ids)
    terms = [F.cross_entropy(logits[row, t], ids[row, t + 1], reduction="sum")
             for row, length in enumerate(lengths) for t in range(length - 1)]
    torch.testing.assert_close(loss, torch.stack(terms).mean())

    garbage = ids.clone()
    garbage[mask == 0] = torch.randint(3, 50, (int((mask == 0).sum()),), generator=gen)
    torch.testing.assert_close(decoder.loss(embedding, garbage, mask), loss)
    wider = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(decoder.loss(embedding, wider, wider_mask), loss)


def test_fit_is_seeded():
    gen = torch.Generator().manual_seed(5)
    embeddings = F.normalize(torch.randn(6, 16, generator=gen), dim=-1)
    ids = torch.randint(3, 50, (6, 8), generator=gen)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    runs = [fit_y_decoder(tiny_decoder(), embeddings, ids, mask, epochs=3, lr=1e-3, batch_size=4, device="cpu",
                          seed=seed) for seed in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    with pytest.raises(ValueError, match="epochs=0"):
        fit_y_decoder(tiny_decoder(), embeddings, ids, mask, epochs=0, lr=1e-3, batch_size=4, device="cpu")


def test_caption_bank_exact_and_top_k_order():
    gen = torch.Generator().manual_seed(2)
    embeddings = torch.randn(len(CAPTIONS), 12, generator=gen)
    scaled = embeddings * torch.linspace(0.1, 50, len(CAPTIONS))[:, None]  # the bank normalises
    bank = CaptionBank(CAPTIONS, scaled)
    assert bank.decode(embeddings) == CAPTIONS
    assert bank.decode(embeddings[5]) == [CAPTIONS[5]]

    queries = torch.randn(3, 12, generator=gen)
    cosine = F.normalize(queries, dim=-1) @ F.normalize(embeddings, dim=-1).T
    order = cosine.argsort(dim=-1, descending=True)[:, :3]
    assert bank.decode(queries, k=3) == [[CAPTIONS[i] for i in row] for row in order.tolist()]
    similarity, indices = bank.nearest(queries, k=3)
    assert torch.equal(indices, order)
    torch.testing.assert_close(similarity, cosine.gather(1, order))

    with pytest.raises(ValueError, match="k=9"):
        bank.decode(queries, k=9)
    with pytest.raises(ValueError, match=r"shape \(3, 5\)"):
        bank.decode(torch.randn(3, 5))
    with pytest.raises(ValueError, match="8 texts but 7 embeddings"):
        CaptionBank(CAPTIONS, embeddings[:7])


def test_decoder_for_kinds_and_errors():
    embeddings = torch.randn(len(CAPTIONS), 12)
    assert isinstance(decoder_for("bank", texts=CAPTIONS, embeddings=embeddings), CaptionBank)
    with pytest.raises(ValueError, match="unknown.*'bank', 'generative'"):
        decoder_for("beam")
    with pytest.raises(ValueError, match="needs embeddings"):
        decoder_for("bank", texts=CAPTIONS)
    with pytest.raises(ValueError, match="needs tokenizer"):
        decoder_for("generative", decoder=tiny_decoder())
    with pytest.raises(ValueError, match="does not take decoder"):
        decoder_for("bank", texts=CAPTIONS, embeddings=embeddings, decoder=tiny_decoder())
    with pytest.raises(ValueError, match="YDecoder"):
        GenerativeDecoder(torch.nn.Linear(2, 2), tokenizer=object())
