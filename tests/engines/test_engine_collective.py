"""The collective weight transfer into the real vLLM engine (the session's shared engine): the
learner's side of the group (rank 0) in this process, the engine's worker (rank 1) in vLLM's
worker process, gloo between them."""

from __future__ import annotations

import asyncio
import copy

import pytest

from espo_async import weights as W
from espo_async.engines.weights import publish_safetensors, state_dict_to_bytes, to_state_dict
from espo_async.weights.collective import CollectivePublisher
from espo_async.weights.files import FilePublisher

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

PROMPTS = ["12+34=", "99-1=A"]
WAIT_S = 120.0


class ModelSource:
    """The learner's trainer, for the publisher: a transformers model's weights."""

    def __init__(self, model) -> None:
        self.model = model

    def policy_tensors(self):
        return {k: v.clone() for k, v in to_state_dict(self.model).items()}

    def save_policy_weights(self, path, *, digest=True, durable=True):
        return publish_safetensors(to_state_dict(self.model), path, digest=digest, durable=durable)

    save_critic_weights = save_policy_weights


def perturbed(hf_model, tok, char="7", factor=6.0):
    """A copy whose output row for ``char`` is scaled (that token becomes dominant)."""
    import torch

    m = copy.deepcopy(hf_model)
    with torch.no_grad():
        m.lm_head.weight[tok.convert_tokens_to_ids(char)] *= factor
    return m


async def greedy(engine, tok, tag: str) -> list[list[int]]:
    out = []
    for i, text in enumerate(PROMPTS):
        ids = [tok.bos_token_id] + tok.encode(text)
        chunks = [c async for c in engine.generate(f"{tag}-{i}", ids, max_tokens=16, temperature=0.0)]
        out.append([int(t) for c in chunks for t in c.token_ids])
    return out


async def test_collective_update_serves_what_a_file_reload_serves(engine, tiny_tokenizer, hf_tiny, tmp_path):
    tok = tiny_tokenizer
    before = await greedy(engine, tok, "coll-before")
    new = perturbed(hf_tiny, tok)
    pub = CollectivePublisher(FilePublisher(tmp_path, keep_versions=3), host="127.0.0.1", members=1,
                              timeout_s=60, join_timeout_s=WAIT_S)
    try:
        # the group forming: the version comes as a file (the same weights), and the engine joins
        m0 = pub.publish(ModelSource(hf_tiny), "policy", 100, step=0, epoch="e")
        await W.loader_for(m0.uri, engine).load(m0)
        assert await asyncio.to_thread(pub.wait_formed, WAIT_S) == "ready"

        # the new weights through the group (no file)
        m1 = pub.publish(ModelSource(new), "policy", 101, step=1, epoch="e")
        assert m1.tensors and "file=" not in m1.uri
        await W.loader_for(m1.uri, engine).load(m1)
        assert await asyncio.to_thread(pub.wait_sent, WAIT_S) and pub.state == "ready", pub.error
        report = engine.last_load_reports[0]
        assert report["rank"] == 1 and report["num_tensors"] == len(m1.tensors) and report["version"] == "101"
        collective = await greedy(engine, tok, "coll-after")
        assert engine.weight_version == "101"

        # the same weights from a file, loaded over the original ones
        await engine.update_weights(state_dict_to_bytes(hf_tiny), version=102)
        assert await greedy(engine, tok, "coll-orig") == before
        path = tmp_path / "new.safetensors"
        publish_safetensors(to_state_dict(new), path)
        await engine.update_weights(path, version=103)
        from_file = await greedy(engine, tok, "coll-file")
    finally:
        pub.close()
        await engine.update_weights(state_dict_to_bytes(hf_tiny), version=0)  # the next tests' weights
    assert collective == from_file
    assert collective != before
