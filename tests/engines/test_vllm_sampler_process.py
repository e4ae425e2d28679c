"""The vLLM sampler as an actor process (real engine, real sockets); the test plays the
coordinator, the stopper and the learner. One sampler process (one engine start) per module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import pytest_asyncio
import torch

import protocols as P
from espo_async.config import parse_config
from espo_async.engines.weights import save_weights_safetensors
from espo_async.tasks.registry import make_task
from espo_async.runtime.harness import ActorHarness

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="module")]

BINDS = ["work", "stopper_stream", "critic_stream", "stopper_cancel", "results", "broadcast"]
TASK = {"name": "arithmetic", "options": {"n_steps": 3}}
# The cancel test's rollout length. Under CPU contention (a loaded CI box) the engine core keeps
# generating while the sampler and this test wait for a time slice: on 2 cores with three busy
# processes beside them, a 400-token rollout ended before a cancel sent 9 ms after its 4th token
# arrived (every attempt). At this length the engine needs seconds, not one slice, to outrun it.
LONG = 6000


def long_context_copy(model_dir: str, dest) -> str:
    """The tiny model with its RoPE context raised to LONG + prompt: same weights (linked), one
    config field changed; RoPE has no learned positions, so the weights serve any length."""
    import json
    import shutil
    from pathlib import Path

    src, dest = Path(model_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "config.json":
            config = json.loads(f.read_text())
            config["max_position_embeddings"] = LONG + 256
            (dest / f.name).write_text(json.dumps(config))
        elif f.is_file():
            try:
                os.link(f, dest / f.name)
            except OSError:
                shutil.copy2(f, dest / f.name)
    return str(dest)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sampler(tmp_path_factory, tiny_model_dir):
    cfg = parse_config(
        {
            "task": TASK,
            "rollout": {"max_tokens": LONG},  # the sampler rejects training work above T_max
            "actors": {
                "sampler": {
                    "class": "actors.samplers.vllm:VLLMSampler",
                    # ignore_eos: every rollout runs to max_tokens, so a cancel always lands in flight
                    # engine_nice: its engine processes yield the core to the sampler's own
                    "options": {"max_num_seqs": 2, "kv_cache_gib": 1.0, "max_model_len": LONG + 256, "ignore_eos": True,
                                "engine_nice": 3},
                }
            },
            "transport": {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 120},
        }
    )
    model_dir = long_context_copy(tiny_model_dir, tmp_path_factory.mktemp("tiny-long"))
    assets = {"policy_dir": model_dir, "critic_dir": model_dir, "critic_from_policy": True}
    run_dir = tmp_path_factory.mktemp("vllm-sampler")
    # nice: this test plays the stopper and must answer a streamed token while the engine runs.
    async with ActorHarness(cfg, run_dir, "sampler-0", binds=BINDS, assets=assets, nice=5) as h:
        await h.start(timeout=240)
        ident, msg = await h.recv_routed("work", timeout=60)
        assert isinstance(msg, P.WorkRequest) and msg.free_slots == 2
        h.ident = ident
        yield h


def work(tokenizer, n=0, *, temperature=1.0, max_tokens=48, version=0, rid=None):
    task = make_task(TASK["name"], **TASK["options"])
    problem = task.eval_problems()[n]
    ids = np.asarray(tokenizer.encode(task.format_prompt(problem)), dtype=np.int32)
    pid = f"g{n}/{problem.id}"
    return P.PromptWork(
        request_id=rid or f"{pid}#0",
        prompt_id=pid,
        sample_index=0,
        group_size=1,
        prompt_token_ids=ids,
        max_tokens=max_tokens,
        temperature=temperature,
        issued_at_version=version,
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def drain_work(h):
    """WorkDone + WorkRequest follow every trajectory; consume them."""
    for _ in range(2):
        await h.recv_routed("work", timeout=30)


async def test_engine_processes_run_at_engine_nice_below_the_sampler(sampler):
    import psutil

    mine = os.getpriority(os.PRIO_PROCESS, sampler.proc.pid)
    engine = [p for p in psutil.Process(sampler.proc.pid).children(recursive=True) if p.name().startswith("VLLM")]
    assert {p.name()[:15] for p in engine} >= {"VLLM::EngineCor", "VLLM::Worker"}
    for p in engine:
        for t in p.threads():
            assert os.getpriority(os.PRIO_PROCESS, t.id) == min(19, mine + 3), (p.name(), t.id)


async def test_tokens_and_logprobs_stream_and_match_the_trajectory(sampler, tokenizer):
    h = sampler
    w = work(tokenizer, 0, rid="stream#0")
    await h.send_to("work", h.ident, w)
    traj = await h.recv("results", timeout=60)
    end, frames = await h.recv_until("stopper_stream", lambda m: isinstance(m, P.StreamEnd), timeout=30)
    assert all(isinstance(m, P.TokenBatch) for m in frames)  # one frame per engine step
    chunks = [c for m in frames for c in m.chunks()]
    assert all(c.request_id == "stream#0" for c in chunks) and end.request_id == "stream#0"
    streamed = np.concatenate([c.token_ids for c in chunks])
    assert streamed.tolist() == traj.token_ids.tolist() and len(streamed) > 0
    lp = np.concatenate([c.logprobs for c in chunks])
    top1 = np.concatenate([c.top1_logprobs for c in chunks])
    assert np.all(np.isfinite(lp)) and np.all(top1 >= lp - 1e-4)  # the regret g_t >= 0
    assert traj.ending == "truncated" and len(traj.token_ids) == w.max_tokens  # ignore_eos
    assert traj.text == tokenizer.decode(traj.token_ids, skip_special_tokens=True)
    assert (traj.versions == 0).all()
    await drain_work(h)


async def test_cancel_aborts_the_engine_request_and_frees_the_slot(sampler, tokenizer):
    """A cancel that reaches the sampler while the request runs aborts it in the engine. The
    rollout is LONG tokens so that the cancel's round trip lands in flight even on a loaded
    machine; an attempt whose cancel still arrives after the end (counted as cancel_after_end)
    is tried again, and the failure says how far the engine got."""
    h = sampler
    outran = []
    for attempt in range(3):
        rid = f"cancel#{attempt}"
        await h.send_to("work", h.ident, work(tokenizer, 1, max_tokens=LONG, rid=rid))
        seen = 0
        while seen < 4:
            msg = await h.recv("stopper_stream", timeout=60)
            for chunk in msg.chunks() if isinstance(msg, P.TokenBatch) else ():
                if chunk.request_id == rid:
                    seen = chunk.start + len(chunk.token_ids)
        await h.send_to("stopper_cancel", b"sampler-0", P.Cancel(request_id=rid, sampler_id="sampler-0", stop_index=2))
        traj, _ = await h.recv_until("results", lambda m: isinstance(m, P.Trajectory) and m.request_id == rid, timeout=30)
        (_, done), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkDone), routed=True, timeout=30)
        (_, again), _ = await h.recv_until("work", lambda m: isinstance(m, P.WorkRequest), routed=True, timeout=30)
        assert again.free_slots == 1
        if traj.ending != "absorbed":  # finished before the cancel arrived
            assert traj.ending == "truncated" and len(traj.token_ids) == LONG
            outran.append(seen)
            continue
        assert len(traj.token_ids) == 3 and traj.finish_reason == "abort"
        assert traj.tokens_generated < LONG  # aborted in flight: without the cancel it would run to LONG
        await h.wait_heartbeat(lambda hb: hb.counters.get("active") == 0 and hb.counters.get("cancels") == 1,
                               fresh_only=True)
        return
    pytest.fail(f"every request ran to {LONG} tokens before its cancel arrived (sent after "
                f"{outran} tokens were seen): the sampler or this test was starved of the CPU")


async def test_weight_update_changes_greedy_output_to_the_learners_model(sampler, tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    h = sampler
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    target = tokenizer.convert_tokens_to_ids("7")
    w = work(tokenizer, 2, temperature=0.0, max_tokens=24, version=1, rid="update#0")
    prompt = torch.tensor([w.prompt_token_ids.tolist()])

    def greedy():  # like the sampler here: no stop at EOS (ignore_eos), exactly 24 tokens
        out = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
        return out[0, prompt.shape[1]:].tolist()

    before = greedy()
    with torch.no_grad():  # make "7" dominant: an unmistakable change of the greedy output
        model.lm_head.weight[target] *= 6.0
    path = tmp_path / "policy-v1.safetensors"
    save_weights_safetensors(model, path)
    after = greedy()
    assert after != before  # the perturbation changes what the learner's model says
    await h.send_to("work", h.ident, w)  # waits in the sampler until version 1 is loaded
    announce = P.WeightsAnnounced(model="policy", version=1, uri=f"file://{path}", sha256="", nbytes=0)
    traj = None
    while traj is None:  # PUB/SUB: the learner repeats announcements; so do we
        await h.send("broadcast", announce)
        try:
            traj = await h.recv("results", timeout=1.0)
        except TimeoutError:
            pass
    assert (traj.versions == 1).all()
    assert traj.token_ids.tolist() == after  # the engine now says exactly what the new model says
