"""The vLLM engine wrapper on the embedded tiny model (one engine for the whole session)."""

from __future__ import annotations

import asyncio
import copy
import time

import numpy as np
import pytest

from espo_async.engines.vllm_engine import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, TokenChunk

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

LP_TOL = 2e-4  # vLLM fp32 vs transformers fp32 log-probabilities


# ----------------------------------------------------------------------------- helpers
async def collect(engine, rid, prompt, **kw) -> list[TokenChunk]:
    return [ch async for ch in engine.generate(rid, prompt, **kw)]


def cat(chunks: list[TokenChunk]) -> dict[str, np.ndarray]:
    return {
        k: np.concatenate([getattr(c, k) for c in chunks])
        for k in ("token_ids", "logprobs", "top1_logprobs", "top1_token_ids", "ranks")
    }


def check_stream_shape(chunks: list[TokenChunk]) -> None:
    assert chunks, "no output"
    assert all(not c.finished for c in chunks[:-1])
    assert chunks[-1].finished
    off = 0
    for c in chunks:
        assert c.offset == off
        n = len(c)
        for arr in (c.logprobs, c.top1_logprobs, c.top1_token_ids, c.ranks):
            assert arr.shape == (n,)
        off += n


def prompt_ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok.encode(text)


def hf_teacher_forced(model, prompt: list[int], response: list[int]):
    """(logprob of each response token, top-1 logprob at each position) under ``model``."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    lp = torch.log_softmax(logits, -1)[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    sampled = lp[torch.arange(len(response)), torch.tensor(response)]
    return sampled.numpy(), lp.max(-1).values.numpy()


def hf_greedy(model, prompt: list[int], n: int, eos: int):
    """Greedy continuation and, per step, the top1 - top2 log-prob margin."""
    import torch

    ids, out, margins = list(prompt), [], []
    with torch.no_grad():
        for _ in range(n):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            top = torch.topk(lp, 2)
            t = int(top.indices[0])
            out.append(t)
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(t)
            if t == eos:
                break
    return out, margins


def safe_prefix(margins: list[float], tol: float = 1e-4) -> int:
    """Length of the greedy prefix whose argmax is unambiguous at fp32 precision."""
    for i, m in enumerate(margins):
        if m < tol:
            return i
    return len(margins)


# ----------------------------------------------------------------------------- streaming
async def test_stream_tokens_and_logprobs_consistent(engine, tiny_tokenizer, hf_tiny):
    tok = tiny_tokenizer
    prompt = prompt_ids(tok, "12+34=")
    chunks = await collect(
        engine, "stream-1", prompt, max_tokens=64, temperature=1.0, ignore_eos=True, seed=1234
    )
    check_stream_shape(chunks)
    assert chunks[-1].finish_reason == FINISH_LENGTH
    a = cat(chunks)
    assert a["token_ids"].shape == (64,)
    assert np.all(np.isfinite(a["logprobs"])) and np.all(a["logprobs"] <= 0)
    # the top-1 log-prob bounds the sampled one; rank 1 <=> sampled token is the top-1 token
    assert np.all(a["top1_logprobs"] >= a["logprobs"] - 1e-6)
    assert np.all(a["ranks"] >= 1)
    is_top = a["ranks"] == 1
    np.testing.assert_allclose(a["logprobs"][is_top], a["top1_logprobs"][is_top], atol=1e-6)
    assert np.all(a["top1_token_ids"][is_top] == a["token_ids"][is_top])
    assert np.all(a["top1_token_ids"][~is_top] != a["token_ids"][~is_top])
    # raw log-probs are the model's: transformers agrees under teacher forcing
    hf_lp, hf_top = hf_teacher_forced(hf_tiny, prompt, a["token_ids"].tolist())
    np.testing.assert_allclose(a["logprobs"], hf_lp, atol=LP_TOL)
    np.testing.assert_allclose(a["top1_logprobs"], hf_top, atol=LP_TOL)
    # detokenization: exact characters, no spaces inserted, special tokens skipped
    text = "".join(c.text for c in chunks)
    assert text == tok.decode(a["token_ids"].tolist(), skip_special_tokens=True)
    assert text == engine.decode(a["token_ids"])
    assert " " not in text
    assert engine.num_running() == 0


async def test_greedy_matches_transformers(engine, tiny_tokenizer, hf_tiny):
    tok = tiny_tokenizer
    prompt = prompt_ids(tok, "7*8=")
    chunks = await collect(engine, "greedy-1", prompt, max_tokens=32, temperature=0.0)
    check_stream_shape(chunks)
    a = cat(chunks)
    # temperature 0: the sampled token IS the top-1 token
    assert np.all(a["ranks"] == 1)
    assert np.array_equal(a["token_ids"], a["top1_token_ids"])
    np.testing.assert_array_equal(a["logprobs"], a["top1_logprobs"])
    ref, margins = hf_greedy(hf_tiny, prompt, 32, tok.eos_token_id)
    k = safe_prefix(margins)
    assert k >= 8, f"tiny model too ambiguous for a greedy comparison: {margins}"
    assert a["token_ids"][:k].tolist() == ref[:k]


async def test_eos_stops_generation(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = prompt_ids(tok, "1+1=")
    finishes = []
    for seed in range(12):
        chunks = await collect(
            engine, f"eos-{seed}", prompt, max_tokens=100, temperature=1.0, seed=seed
        )
        check_stream_shape(chunks)
        a = cat(chunks)
        fin = chunks[-1].finish_reason
        finishes.append(fin)
        if fin == FINISH_STOP:
            assert a["token_ids"][-1] == tok.eos_token_id
            assert tok.eos_token_id not in a["token_ids"][:-1].tolist()
            assert "<eos>" not in "".join(c.text for c in chunks)
            break
        assert fin == FINISH_LENGTH and len(a["token_ids"]) == 100
    assert FINISH_STOP in finishes, finishes


async def test_stop_token_ids(engine, tiny_tokenizer):
    tok = tiny_tokenizer
    semi = tok.convert_tokens_to_ids(";")
    prompt = prompt_ids(tok, "9-3=")
    for seed in range(12):
        chunks = await collect(
            engine, f"stopid-{seed}", prompt, max_tokens=100, temperature=1.0, seed=seed,
            stop_token_ids=[semi], ignore_eos=True,
        )
        a = cat(chunks)
        if chunks[-1].finish_reason == FINISH_STOP:
            assert chunks[-1].stop_reason == semi
            assert a["token_ids"][-1] == semi  # the stop token is kept in token_ids
            assert semi not in a["token_ids"][:-1].tolist()
            return
    pytest.fail("';' never sampled in 12 seeds")


async def test_duplicate_request_id_rejected_and_early_exit_frees_slot(engine, tiny_tokenizer):
    prompt = prompt_ids(tiny_tokenizer, "5=")
    gen = engine.generate("dup", prompt, max_tokens=200, temperature=1.0, ignore_eos=True)
    first = await gen.__anext__()
    assert engine.is_active("dup")
    with pytest.raises(ValueError):
        await collect(engine, "dup", prompt, max_tokens=4)
    # leaving the iteration early aborts the request in the engine
    n = len(first)
    async for ch in gen:
        n += len(ch)
        if n >= 5:
            break
    await gen.aclose()
    assert not engine.is_active("dup")
    for _ in range(100):
        if engine.engine_unfinished() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.engine_unfinished() == 0


async def test_prompt_too_long_is_an_error_not_a_leak(engine):
    with pytest.raises(Exception, match="(?i)length|long|context|max_model_len"):
        await collect(engine, "too-long", [5] * (engine.max_model_len + 10), max_tokens=4)
    assert engine.num_running() == 0 and not engine.is_active("too-long")
    with pytest.raises(ValueError):
        await collect(engine, "empty", [], max_tokens=4)


# ----------------------------------------------------------------------------- abort
async def test_abort_mid_stream_frees_slot_at_once(engine, tiny_tokenizer):
    """Fill every slot, queue one more request, abort one running request: the aborted
    stream ends at once (<= 1 token after the call) and the queued request starts while the
    other long request is still running."""
    assert engine.max_num_seqs == 2
    prompt = prompt_ids(tiny_tokenizer, "3+4=")
    max_tokens = engine.max_model_len - len(prompt) - 1
    got: dict[str, list[TokenChunk]] = {"A": [], "B": [], "C": []}
    first_t: dict[str, float] = {}

    async def consume(rid):
        async for ch in engine.generate(rid, prompt, max_tokens=max_tokens, temperature=1.0,
                                        ignore_eos=True, seed=7):
            if len(ch) and rid not in first_t:
                first_t[rid] = time.monotonic()
            got[rid].append(ch)

    tasks = {r: asyncio.create_task(consume(r)) for r in ("A", "B")}
    deadline = time.monotonic() + 30
    while sum(len(c) for c in got["A"]) < 10 or not got["B"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    tasks["C"] = asyncio.create_task(consume("C"))
    await asyncio.sleep(0.3)  # C is queued: both slots are busy
    assert "C" not in first_t, "C started although every slot was busy"
    assert engine.num_running() == 3

    t_abort = time.monotonic()
    assert await engine.abort("A")
    await asyncio.wait_for(tasks["A"], timeout=2.0)
    t_end = time.monotonic() - t_abort
    last = got["A"][-1]
    assert last.finish_reason == FINISH_ABORT
    assert last.tokens_after_abort is not None and last.tokens_after_abort <= 1
    assert t_end < 0.5, f"aborted stream took {t_end:.3f} s to end"
    n_a = sum(len(c) for c in got["A"])
    assert 10 <= n_a < max_tokens

    # the freed slot goes to C at once, while B is still running
    deadline = time.monotonic() + 5
    while "C" not in first_t:
        assert time.monotonic() < deadline, "C did not start after the abort"
        await asyncio.sleep(0.002)
    assert first_t["C"] - t_abort < 2.0
    assert not got["B"][-1].finished, "B finished before C started: the slot was not freed"

    assert await engine.abort("B") and await engine.abort("C")
    await asyncio.wait_for(asyncio.gather(tasks["B"], tasks["C"]), timeout=5)
    assert got["B"][-1].finish_reason == got["C"][-1].finish_reason == FINISH_ABORT
    assert engine.num_running() == 0
    assert not await engine.abort("A")  # no longer in flight: a no-op
    for _ in range(100):
        if engine.engine_unfinished() == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.engine_unfinished() == 0


# ----------------------------------------------------------------------------- weights
def perturbed_copy(hf_model, tok, char="7", factor=6.0):
    """A copy whose output row for ``char`` is scaled: that token becomes dominant."""
    import torch

    m = copy.deepcopy(hf_model)
    t = tok.convert_tokens_to_ids(char)
    with torch.no_grad():
        m.lm_head.weight[t] *= factor
    return m


async def greedy_engine(engine, rid, prompt, n):
    chunks = await collect(engine, rid, prompt, max_tokens=n, temperature=0.0)
    return cat(chunks)["token_ids"].tolist(), chunks


async def test_update_weights_changes_greedy_output(engine, tiny_tokenizer, hf_tiny, tmp_path):
    from espo_async.engines.weights import save_weights_safetensors, state_dict_to_bytes

    tok = tiny_tokenizer
    prompt = prompt_ids(tok, "12+34=")
    n = 32
    before, _ = await greedy_engine(engine, "w-before", prompt, n)
    ref0, m0 = hf_greedy(hf_tiny, prompt, n, tok.eos_token_id)
    k0 = safe_prefix(m0)
    assert before[:k0] == ref0[:k0]

    new = perturbed_copy(hf_tiny, tok)
    ref1, m1 = hf_greedy(new, prompt, n, tok.eos_token_id)
    k1 = safe_prefix(m1)
    assert ref1 != ref0, "perturbation did not change the greedy output"
    assert ref1.count(tok.convert_tokens_to_ids("7")) > ref0.count(tok.convert_tokens_to_ids("7"))

    # 1) from a file
    path = tmp_path / "w1.safetensors"
    sha = save_weights_safetensors(new, path)
    assert len(sha) == 64 and path.exists()
    dt = await engine.update_weights(path, version=1)
    assert dt < 10
    after, chunks = await greedy_engine(engine, "w-after", prompt, n)
    assert after[:k1] == ref1[:k1]
    assert chunks[-1].weight_versions == [("1", 0, len(after))]
    assert engine.weight_version == "1"

    # 2) back to the original weights, from an in-memory blob
    blob = state_dict_to_bytes(hf_tiny)
    dt = await engine.update_weights(blob, version=2)
    restored, chunks = await greedy_engine(engine, "w-restored", prompt, n)
    assert restored == before
    assert chunks[-1].weight_versions == [("2", 0, len(restored))]


async def test_update_weights_refuses_partial_state_dict(engine, hf_tiny):
    from espo_async.engines.weights import state_dict_to_bytes

    name = "model.layers.0.self_attn.q_proj.weight"  # one third of vLLM's fused qkv_proj
    partial = state_dict_to_bytes({name: hf_tiny.get_parameter(name).detach()})
    with pytest.raises(ValueError, match="allow_partial"):
        await engine.update_weights(partial, version="partial")
    assert engine.weight_version != "partial"


@pytest.mark.parametrize("recompute_kv", [True, False], ids=["recompute-kv", "keep-kv"])
async def test_update_weights_while_generating(engine, tiny_tokenizer, hf_tiny, recompute_kv):
    """A request in flight survives a weight update, with its KV cache recomputed or kept: no
    token lost or repeated, and vLLM's weight-version spans say which tokens came from which
    weights."""
    from espo_async.engines.weights import state_dict_to_bytes

    prompt = prompt_ids(tiny_tokenizer, "8*8=")
    max_tokens = 400
    got: list[TokenChunk] = []

    async def consume():
        async for ch in engine.generate(f"w-live-{recompute_kv}", prompt, max_tokens=max_tokens,
                                        temperature=1.0, ignore_eos=True, seed=3):
            got.append(ch)

    task = asyncio.create_task(consume())
    deadline = time.monotonic() + 30
    while sum(len(c) for c in got) < 20:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.002)
    version = 3 if recompute_kv else 4
    await engine.update_weights(state_dict_to_bytes(hf_tiny), version=version, recompute_kv=recompute_kv)
    await asyncio.wait_for(task, timeout=60)
    check_stream_shape(got)
    a = cat(got)
    assert len(a["token_ids"]) == max_tokens and got[-1].finish_reason == FINISH_LENGTH
    spans = got[-1].weight_versions
    assert spans is not None and spans[-1][0] == str(version) and spans[-1][2] == max_tokens
    assert len(spans) == 2 and spans[0][1] == 0 and spans[0][2] == spans[1][1] >= 20
    # the weights are the same values, so the log-probs still match transformers
    hf_lp, _ = hf_teacher_forced(hf_tiny, prompt, a["token_ids"].tolist())
    np.testing.assert_allclose(a["logprobs"], hf_lp, atol=LP_TOL)


# ----------------------------------------------------------------------------- shutdown
@pytest.mark.engine_shutdown
async def test_shutdown_leaves_no_processes(engine, tiny_tokenizer):
    import psutil

    pids = engine.pids()
    assert pids, "engine processes were not recorded"
    assert all(psutil.pid_exists(p) for p in pids)
    # a request in flight at shutdown is aborted, not leaked
    prompt = prompt_ids(tiny_tokenizer, "1=")
    got: list[TokenChunk] = []

    async def consume():
        async for ch in engine.generate("late", prompt, max_tokens=200, temperature=1.0,
                                        ignore_eos=True):
            got.append(ch)

    task = asyncio.create_task(consume())
    while not got:
        await asyncio.sleep(0.005)
    t0 = time.monotonic()
    await engine.shutdown()
    await asyncio.wait_for(task, timeout=5)
    assert got[-1].finish_reason == FINISH_ABORT
    assert time.monotonic() - t0 < 30

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    assert not [p for p in pids if alive(p)]
    with pytest.raises(RuntimeError):
        await collect(engine, "after", prompt, max_tokens=2)
    await engine.shutdown()  # idempotent
