"""Retaining heads: training lowers the held-out loss, files refuse other models, Locret import, eviction by heads."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cli_helpers import assert_one_sentence, run_cli
from edgectx.engine import Engine
from edgectx.memory.heads import HeadsError, HeadsInfo, HeadsScorer, RetainingHeads, import_locret, load_heads, save_heads
from edgectx.train.heads import TrainSettings, collect, evaluate, fit, standardize
from edgectx.memory.context import ContextMemory
from edgectx.memory.config import MemoryConfig
from tiny_gguf import write_tiny_gguf

SMALL_TRAIN = TrainSettings(hidden=32, seq_len=512, offset=32, span=64, skip_first=16, window=64, batch=4,
                            steps=150, eval_every=50, lr=3e-3)


def _ids(n: int) -> list[int]:
    return [5 + (i * 7919 + i // 3) % 180 for i in range(n)]  # deterministic, varied byte tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("heads") / "tiny.gguf", n_layers=2, context_length=1024)
    return Engine.load(path, device="cpu")


def test_training_lowers_heldout_loss_and_folds_the_input_scale(tiny):
    feats, labels = collect(tiny, _ids(4 * 512), SMALL_TRAIN)
    assert feats.shape[:2] == (2, 4) and labels.shape[-1] == tiny.spec.n_kv_heads
    assert torch.isfinite(labels).all()
    train_x, test_x, train_y, test_y = feats[:, :3], feats[:, 3:], labels[:, :3], labels[:, 3:]
    torch.manual_seed(0)
    heads = RetainingHeads(tiny.spec, SMALL_TRAIN.hidden)
    scale = train_x.float().pow(2).mean(dim=(1, 2)).sqrt()[:, None, :]
    before = evaluate(heads, test_x, standardize(train_y, test_y)[1], scale)
    curve = fit(heads, train_x, train_y, test_x, test_y, SMALL_TRAIN)
    assert [p["step"] for p in curve] == [50, 100, 150]
    assert curve[-1]["heldout_loss"] < 0.5 * before["heldout_loss"]
    assert curve[-1]["heldout_recall"] > max(0.5, before["heldout_recall"] + 0.2)
    # The scale now lives in fc1: raw projections give the same predictions the curve measured.
    after = evaluate(heads, test_x, standardize(train_y, test_y)[1], torch.ones_like(scale))
    assert after["heldout_loss"] == pytest.approx(curve[-1]["heldout_loss"], rel=1e-4)


def test_cache_gives_back_what_reading_gave_and_rereads_damaged_files(tiny, tmp_path, monkeypatch):
    from dataclasses import replace

    from edgectx.train.cache import SequenceCache

    ids = _ids(2 * 512)
    cache = SequenceCache(tmp_path, tiny.fingerprint, SMALL_TRAIN)
    read = collect(tiny, ids, SMALL_TRAIN, cache=cache)
    assert (cache.hits, cache.misses) == (0, 2) and len(list(tmp_path.glob("*.safetensors"))) == 2

    def no_reading(*args):
        raise AssertionError("a cached sequence was read again")

    with monkeypatch.context() as m:
        m.setattr(tiny, "model", no_reading)
        again = SequenceCache(tmp_path, tiny.fingerprint, SMALL_TRAIN)
        cached = collect(tiny, ids, SMALL_TRAIN, cache=again)
    assert again.hits == 2
    assert torch.equal(read[0], cached[0]) and torch.equal(read[1], cached[1])
    # Other label settings or another model name other files; a damaged file is read again and replaced.
    assert SequenceCache(tmp_path, tiny.fingerprint, replace(SMALL_TRAIN, span=32)).path(ids[:512]) != cache.path(ids[:512])
    assert SequenceCache(tmp_path, "other", SMALL_TRAIN).path(ids[:512]) != cache.path(ids[:512])
    damaged = cache.path(ids[:512])
    damaged.write_bytes(damaged.read_bytes()[:100])
    third = SequenceCache(tmp_path, tiny.fingerprint, SMALL_TRAIN)
    reread = collect(tiny, ids, SMALL_TRAIN, cache=third)
    assert (third.hits, third.misses) == (1, 1)
    assert torch.equal(reread[0], read[0]) and SequenceCache(tmp_path, tiny.fingerprint, SMALL_TRAIN).load(
        ids[:512], tuple(read[0][:, 0].shape), tuple(read[1][:, 0].shape)) is not None


def test_top_weight_makes_errors_on_important_tokens_cost_more():
    from edgectx.train.heads import _losses

    target = torch.tensor([-1.0, 0.0, 3.0]).reshape(1, 1, 3, 1)
    miss_top = target - torch.tensor([0.0, 0.0, 0.5]).reshape(1, 1, 3, 1)  # the same error, on the important token
    miss_low = target - torch.tensor([0.5, 0.0, 0.0]).reshape(1, 1, 3, 1)  # or on an unimportant one
    plain = torch.nn.functional.smooth_l1_loss(miss_top, target)
    assert _losses(miss_top, target, 0.0, 0.0)[0] == pytest.approx(float(plain))
    assert _losses(miss_low, target, 0.0, 0.0)[0] == pytest.approx(float(plain))
    assert _losses(miss_top, target, 0.0, 1.0)[0] > 2 * _losses(miss_low, target, 0.0, 1.0)[0]


def test_logprob_labels_are_log_attention_probabilities(tiny):
    from dataclasses import replace

    ids = _ids(2 * 512)
    _, logits = collect(tiny, ids, SMALL_TRAIN)
    _, logprobs = collect(tiny, ids, replace(SMALL_TRAIN, label="logprob"))
    assert logits.max() > 0  # raw logits: unbounded, some positive here
    assert logprobs.max() <= 1e-5 and logprobs.min() > -60  # log probabilities: never above 0, and finite


def test_oracle_scores_are_the_training_labels(tiny):
    from edgectx.bench.oracle import UNREACHED, oracle_scorer

    ids, s = _ids(512), SMALL_TRAIN
    _, labels = collect(tiny, ids, s)  # (L, 1, kept, n_kv) for tokens skip_first .. 512 - offset - span
    tiny.configure_memory(None)
    oracle = oracle_scorer(tiny, ids, "oracle", offset=s.offset, span=s.span)
    kept = slice(s.skip_first, 512 - s.offset - s.span)
    for layer in range(tiny.spec.n_layers):
        torch.testing.assert_close(oracle.labels[layer][:, kept], labels[layer, 0].T)
        assert bool((oracle.labels[layer][:, 512 - s.offset :] == UNREACHED).all())  # no later query: kept
        assert bool((oracle.labels[layer][:, : 512 - s.offset] < UNREACHED).all())
    first = oracle.new_token_scores(1, None, torch.empty(2, 5, 1), None, 100)
    torch.testing.assert_close(first, oracle.labels[1][:, 100:105])


def test_heads_file_round_trip_and_refusals(tiny, tmp_path):
    heads = RetainingHeads(tiny.spec, 16)
    path = save_heads(heads, tmp_path / "h.safetensors", HeadsInfo(tiny.fingerprint, "tiny.gguf", "trained", {"x": 1}))
    loaded, info = load_heads(path, tiny.spec, tiny.fingerprint)
    assert torch.equal(loaded.fc1, heads.fc1.detach().half().float()) and info.training == {"x": 1}
    with pytest.raises(HeadsError, match="another model"):
        load_heads(path, tiny.spec, "0" * 64)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(HeadsError, match="not a readable safetensors"):
        load_heads(cut, tiny.spec, tiny.fingerprint)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other))
    with pytest.raises(HeadsError, match="not edgectx retaining heads"):
        load_heads(other, tiny.spec, tiny.fingerprint)


def _locret_state(spec, hidden=24, n_layers=None):
    n_in = spec.q_dim + 2 * spec.kv_dim
    return {f"model.layers.{i}.self_attn.fc{j}.weight": torch.randn(*((hidden, n_in) if j == 1 else (spec.n_kv_heads, hidden))).bfloat16()
            for i in range(n_layers or spec.n_layers) for j in (1, 2)}


def test_import_locret_state_dict(tiny, tmp_path):
    state = {**_locret_state(tiny.spec), "model.layers.0.self_attn.q_proj.weight": torch.zeros(2)}
    torch.save(state, tmp_path / "locret.pt")
    heads = import_locret(tmp_path / "locret.pt", tiny.spec)
    assert heads.hidden == 24
    assert torch.equal(heads.fc2[1], state["model.layers.1.self_attn.fc2.weight"].float())
    torch.save(_locret_state(tiny.spec, n_layers=3), tmp_path / "wrong.pt")
    with pytest.raises(HeadsError, match="another model"):
        import_locret(tmp_path / "wrong.pt", tiny.spec)


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_import_never_unpickles_code(tiny, tmp_path, capfd):
    bad = tmp_path / "evil.pt"
    with bad.open("wb") as f:
        pickle.dump({"model.layers.0.self_attn.fc1.weight": _Boom()}, f)
    torch.save({"model.layers.0.self_attn.fc1.weight": _Boom()}, tmp_path / "evil2.pt")
    for path in (bad, tmp_path / "evil2.pt"):
        with pytest.raises(HeadsError, match="cannot be imported safely"):
            import_locret(path, tiny.spec)
    assert "unpickled!" not in capfd.readouterr().out


class _Recording(HeadsScorer):
    def __init__(self, heads):
        super().__init__(heads)
        self.seen: list[torch.Tensor] = []

    def new_token_scores(self, layer, q, k, v, first):
        scores = super().new_token_scores(layer, q, k, v, first)
        if layer == 0:
            self.seen.append(scores)
        return scores


def test_heads_scores_decide_eviction(tiny):
    config = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                          chunk_tokens=64, scorer="heads")
    scorer = _Recording(RetainingHeads(tiny.spec, 16))
    memory = ContextMemory(tiny.spec, tiny.rope, tiny.device, tiny.dtype, config, scorer=scorer)
    tiny.memory, tiny.tokens = memory, []
    try:
        tiny.prefill(_ids(900))
    finally:
        tiny.reset()
    scores = torch.cat(scorer.seen, dim=1)  # (n_kv, 900): every token's static score
    r = memory.layers[0].resident
    idx = r.idx[:, : r.n]
    n = memory.n_tokens
    for h in range(tiny.spec.n_kv_heads):
        middle = idx[h][(idx[h] >= config.n_sink) & (idx[h] < n - config.n_local)]
        candidates = scores[h, config.n_sink : n - config.n_local]
        best = torch.topk(candidates, config.n_retain).values
        # Compared as scores: layer 0's features are position-free, so repeated tokens tie and either may stay.
        assert len(middle) == config.n_retain
        assert torch.equal(scores[h, middle].sort().values, best.sort().values)


def test_window_scorer_keeps_the_newest(tiny):
    config = MemoryConfig(budget_tokens=256, n_sink=16, n_local=64, block_size=32, top_k_blocks=2, cache_blocks=4,
                          chunk_tokens=64, scorer="window")
    tiny.configure_memory(config)
    try:
        tiny.prefill(_ids(900))
        r = tiny.memory.layers[0].resident
        kept = r.idx[0, : r.n].tolist()
    finally:
        tiny.configure_memory(None)
    assert kept == list(range(16)) + list(range(900 - config.resident_tokens + 16, 900))


def test_heads_cli_train_info_and_bench(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=2, context_length=1024)
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (i * 7919 + i // 5) % 90) for i in range(6000)))
    common = ("--model", str(model), "--threads", "1")
    info = run_cli("heads", "info", *common)
    assert info.returncode == 0 and "no retaining heads" in info.stdout
    train = run_cli("heads", "train", *common, "--text", str(text), "--seq-len", "512", "--offset", "32", "--span", "64",
                    "--hidden", "16", "--steps", "20", "--tokens", "1536", "--cache", str(tmp_path / "cache"), "--json")
    assert train.returncode == 0, train.stderr
    report = json.loads(train.stdout)
    assert report["curve"][-1]["step"] == 20 and report["heldout_tokens"] > 0 and report["cached_sequences"] == 0
    again = run_cli("heads", "train", *common, "--text", str(text), "--seq-len", "512", "--offset", "32", "--span", "64",
                    "--hidden", "16", "--steps", "20", "--tokens", "1536", "--cache", str(tmp_path / "cache"), "--json")
    assert json.loads(again.stdout)["cached_sequences"] == 3  # 1536 tokens = 3 sequences of 512, none read again
    info = json.loads(run_cli("heads", "info", *common, "--json").stdout)
    assert info["heads"] == report["out"] and info["source"] == "trained" and info["hidden"] == 16
    bench = run_cli("bench", "fidelity", "--model", str(model), "--text", str(text), "--context", "600", "--budget", "256,512",
                    "--scorer", "window,heads", "--chunk", "64", "--json")
    assert bench.returncode == 0, bench.stderr
    runs = json.loads(bench.stdout)["runs"]
    assert [(r["budget_tokens"], r["scorer"]) for r in runs] == [(256, "window"), (256, "heads"), (512, "window"), (512, "heads")]
    assert all(0 < r["top1_agreement"] <= 1 for r in runs)


def test_heads_cli_refuses_bad_input(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf", n_layers=2, context_length=1024)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    assert_one_sentence(run_cli("heads", "train", "--model", str(model), "--text", str(binary)), "binary")
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (i * 7919 + i // 5) % 90) for i in range(6000)))
    assert_one_sentence(run_cli("heads", "train", "--model", str(model), "--text", str(text), "--seq-len", "512", "--offset",
                                "32", "--span", "64", "--steps", "5", "--cache", str(binary)), "not a directory")
    assert_one_sentence(run_cli("heads", "import", str(tmp_path / "missing.pt"), "--model", str(model)), "not found")
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint")
    assert_one_sentence(run_cli("heads", "import", str(notes), "--model", str(model)), "safely")


def test_the_embedded_model_finds_its_shipped_heads(embedded_model):
    """The package ships heads for SmolLM2 (edgectx/data/heads); `auto` eviction uses them."""
    from edgectx.memory.heads import SHIPPED_DIR, find_heads
    from edgectx.model.source import open_model

    path = find_heads(open_model(embedded_model).fingerprint())
    assert path is not None and path.parent == SHIPPED_DIR and path.is_file()
