"""Every message the actors exchange.

Each message is a ``msgspec.Struct`` encoded as a msgpack array (field order is the wire order).
The codec (``protocols.codec``) wraps each one in a frame ``[schema_version, kind, body]``.
Arrays are ``numpy.ndarray`` fields that travel as a msgpack extension holding
``(dtype, shape, raw bytes)``; nothing is ever pickled.

Changing a message (adding, removing, reordering or retyping a field) changes the wire format:
bump ``SCHEMA_VERSION`` in ``protocols.codec`` and say what changed there (its history comment)
and in docs/architecture.md.

Conventions (docs/architecture.md): token index ``t`` is 0-based over the response; ``values``
at position ``t`` is V(s_t), the value of the state in which token ``t`` is chosen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar, Literal, NamedTuple

import msgspec
import numpy as np

Ending = Literal["finished", "absorbed", "truncated", "incomplete"]
"""How a trajectory ended (see docs/architecture.md): EOS / stop rule / max_tokens / T-PPO window."""

Purpose = Literal["train", "eval", "shadow"]
"""Why a rollout exists: training data, held-out evaluation (never stopped, never trained on),
or a shadow continuation of a stopped rollout (measures false-positive stops; never trained on)."""

ActorStatus = Literal["starting", "ready", "running", "stopping", "failed"]
StopKind = Literal["espo", "none", "random", "value_only", "regret_only"]


def _check_1d(name: str, arr: np.ndarray, kinds: str) -> None:
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} has dtype {arr.dtype}, expected kind in {kinds!r}")


def _check_same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"arrays must have equal lengths, got {lengths}")


def _check_token_arrays(*, token_ids: np.ndarray, logprobs: np.ndarray, top1_logprobs: np.ndarray,
                        versions: np.ndarray) -> None:
    """The one check of the per-token arrays every message that carries tokens holds (``TokenChunk``,
    ``TokenBatch``, ``Trajectory``): each 1-D, ids and versions integers, log-probabilities floats,
    all of one length."""
    _check_1d("token_ids", token_ids, "iu")
    _check_1d("logprobs", logprobs, "f")
    _check_1d("top1_logprobs", top1_logprobs, "f")
    _check_1d("versions", versions, "iu")
    _check_same_length(token_ids=token_ids, logprobs=logprobs, top1_logprobs=top1_logprobs, versions=versions)


def _check_counts(name: str, counts: np.ndarray, of: str, total: int, *, least: int) -> None:
    """``counts`` (each >= ``least``) must add up to ``total``, the length of ``of``."""
    if counts.min() < least:
        raise ValueError(f"{name} must be >= {least}, got {int(counts.min())}")
    if counts.max() > total:  # (also keeps the sum below from overflowing)
        raise ValueError(f"{name} has an entry of {int(counts.max())} but {of} holds {total}")
    got = int(counts.sum(dtype=np.int64))
    if got != total:
        raise ValueError(f"{name} add up to {got} but {of} holds {total}")


class Message(msgspec.Struct, array_like=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every wire message. ``KIND`` is the frame's kind tag."""

    KIND: ClassVar[str] = ""


# --------------------------------------------------------------------------------------------
# Work distribution: coordinator <-> samplers (ROUTER/DEALER, credit-based)


WorkIntent = Literal["ordinary", "hello", "slots"]
"""What a ``WorkRequest`` is: an ordinary request (slots came free, or 0 slots: "I am alive"),
the first request of a sampler process (``hello``: it holds all its free slots), or the answer to
a ``SlotsQuery`` (``slots``: all its free slots now)."""


class WorkRequest(Message):
    """Sampler -> coordinator: "I have ``free_slots`` free; send me that many prompts".

    ``session`` names the sampler's process on a host without the coordinator (docs/cluster.md;
    a new session under a known name is a restart); it is empty for a sampler that the
    coordinator's own supervisor watches. ``intent`` says what the request is (``WorkIntent``);
    the coordinator reads it only with a session."""

    KIND: ClassVar[str] = "work_request"
    sampler: str  # the sampler's actor name (its identity on the work socket)
    free_slots: int
    policy_version: int
    session: str = ""
    intent: WorkIntent = "ordinary"

    def __post_init__(self) -> None:
        if self.free_slots < 0:
            raise ValueError(f"free_slots must be >= 0, got {self.free_slots}")


class SlotsQuery(Message):
    """Coordinator -> a sampler on another host: "how many of your slots are free?". Asked when
    the coordinator does not know (it restarted, or it gave that sampler up for lost); the sampler
    answers with a ``WorkRequest`` of intent ``slots``."""

    KIND: ClassVar[str] = "slots_query"
    sampler: str  # the sampler asked (its actor name)
    reason: str = ""


class PromptWork(Message):
    """Coordinator -> sampler: generate one sample of one prompt."""

    KIND: ClassVar[str] = "prompt_work"
    request_id: str
    prompt_id: str
    sample_index: int
    group_size: int
    prompt_token_ids: np.ndarray  # int32[P]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    attempt: int = 0  # > 0 when re-issued after a sampler was lost
    issued_at_version: int = 0  # learner version when the coordinator issued it
    purpose: Purpose = "train"
    # The coordinator's keyed digest of this work's identity (espo_async/ids.py work_tag): the sampler
    # copies it into the trajectory, and the learner takes only trajectories whose tag proves the
    # coordinator of this run issued that work (request, sample, attempt, purpose, prompt).
    tag: bytes = b""

    def __post_init__(self) -> None:
        _check_1d("prompt_token_ids", self.prompt_token_ids, "iu")
        if len(self.prompt_token_ids) == 0:
            raise ValueError("prompt_token_ids is empty")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not 0 <= self.sample_index < self.group_size:
            raise ValueError(f"sample_index {self.sample_index} not in [0, {self.group_size})")


class WorkDone(Message):
    """Sampler -> coordinator: a request ended. ``ending`` is None when it failed in the engine
    and no trajectory was produced (the coordinator issues it again); ``error`` says why."""

    KIND: ClassVar[str] = "work_done"
    sampler_id: str
    request_id: str
    ending: Ending | None
    n_tokens: int
    error: str = ""


# --------------------------------------------------------------------------------------------
# Streams: sampler -> stopper/critic, critic -> stopper (PUSH/PULL fan-in)


class TokenChunk(Message):
    """Tokens ``start .. start+n-1`` of a response, with what sampling already computed."""

    KIND: ClassVar[str] = "token_chunk"
    request_id: str
    sampler_id: str
    start: int
    token_ids: np.ndarray  # int32[n]
    logprobs: np.ndarray  # float32[n]  log pi(a_t | s_t) of the sampled token
    top1_logprobs: np.ndarray  # float32[n]  max_a log pi(a | s_t)
    versions: np.ndarray  # int32[n]  policy version that produced each token
    prompt_token_ids: np.ndarray | None = None  # sent with the first chunk only (for the critic)

    def __post_init__(self) -> None:
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        _check_token_arrays(token_ids=self.token_ids, logprobs=self.logprobs, top1_logprobs=self.top1_logprobs,
                            versions=self.versions)
        if self.prompt_token_ids is not None:
            _check_1d("prompt_token_ids", self.prompt_token_ids, "iu")


class TokenEntry(NamedTuple):
    """One request's part of a ``TokenBatch``, as positions into the batch's flat arrays (plain
    ints: a receiver slices only the arrays it reads)."""

    request_id: str
    start: int  # response position of token_ids[lo]
    lo: int  # this request's tokens are token_ids[lo:hi] (likewise logprobs, top1_logprobs, versions)
    hi: int
    prompt_lo: int  # its prompt is prompt_token_ids[prompt_lo:prompt_hi]; empty: not its first tokens
    prompt_hi: int


class TokenBatch(Message):
    """The new tokens of many requests of ONE sampler (one engine step), as flat arrays: one frame
    instead of one ``TokenChunk`` per request. Request ``i`` holds ``lengths[i]`` tokens, response
    positions ``starts[i] ..``; its tokens follow those of request ``i - 1`` in ``token_ids``,
    ``logprobs``, ``top1_logprobs`` and ``versions``. ``prompt_lengths[i]`` > 0 for a request's
    first tokens: its prompt is the next ``prompt_lengths[i]`` ids of ``prompt_token_ids``.
    Receivers handle the entries in order, each exactly as the equivalent ``TokenChunk``."""

    KIND: ClassVar[str] = "token_batch"
    sampler_id: str
    request_ids: list[str]
    starts: np.ndarray  # int32[k]
    lengths: np.ndarray  # int32[k], each >= 1
    token_ids: np.ndarray  # int32[sum(lengths)]
    logprobs: np.ndarray  # float32[sum(lengths)]
    top1_logprobs: np.ndarray  # float32[sum(lengths)]
    versions: np.ndarray  # int32[sum(lengths)]
    prompt_lengths: np.ndarray  # int32[k], 0 = not the request's first tokens
    prompt_token_ids: np.ndarray  # int32[sum(prompt_lengths)]

    def __post_init__(self) -> None:
        k = len(self.request_ids)
        if k == 0:
            raise ValueError("a token batch holds at least one request")
        for name in ("starts", "lengths", "prompt_lengths"):
            arr = getattr(self, name)
            _check_1d(name, arr, "iu")
            if len(arr) != k:
                raise ValueError(f"{name} has {len(arr)} entries for {k} request ids")
        _check_1d("prompt_token_ids", self.prompt_token_ids, "iu")
        _check_token_arrays(token_ids=self.token_ids, logprobs=self.logprobs, top1_logprobs=self.top1_logprobs,
                            versions=self.versions)
        if self.starts.min() < 0:
            raise ValueError(f"starts must be >= 0, got {int(self.starts.min())}")
        _check_counts("lengths", self.lengths, "token_ids", len(self.token_ids), least=1)
        _check_counts("prompt_lengths", self.prompt_lengths, "prompt_token_ids", len(self.prompt_token_ids), least=0)

    def entries(self) -> Iterator[TokenEntry]:
        """Each request's part, in order (plain ints; no arrays are built)."""
        his = np.cumsum(self.lengths, dtype=np.int64).tolist()
        prompt_his = np.cumsum(self.prompt_lengths, dtype=np.int64).tolist()
        return map(TokenEntry._make, zip(self.request_ids, self.starts.tolist(), [0, *his[:-1]], his,
                                         [0, *prompt_his[:-1]], prompt_his))

    def chunks(self) -> Iterator[TokenChunk]:
        """Each request's part as the equivalent ``TokenChunk`` (views of this batch's arrays)."""
        for e in self.entries():
            yield TokenChunk(
                request_id=e.request_id,
                sampler_id=self.sampler_id,
                start=e.start,
                token_ids=self.token_ids[e.lo : e.hi],
                logprobs=self.logprobs[e.lo : e.hi],
                top1_logprobs=self.top1_logprobs[e.lo : e.hi],
                versions=self.versions[e.lo : e.hi],
                prompt_token_ids=self.prompt_token_ids[e.prompt_lo : e.prompt_hi] if e.prompt_hi > e.prompt_lo else None,
            )

    @classmethod
    def from_chunks(cls, chunks: Sequence[TokenChunk]) -> TokenBatch:
        """The batch holding these chunks (all of one sampler), in order."""
        if not chunks:
            raise ValueError("a token batch holds at least one request")
        sampler_id = chunks[0].sampler_id
        if any(c.sampler_id != sampler_id for c in chunks):
            raise ValueError("a token batch holds the tokens of one sampler")
        empty = np.zeros(0, np.int32)
        prompts = [c.prompt_token_ids if c.prompt_token_ids is not None else empty for c in chunks]
        return cls(
            sampler_id=sampler_id,
            request_ids=[c.request_id for c in chunks],
            starts=np.array([c.start for c in chunks], np.int32),
            lengths=np.array([len(c.token_ids) for c in chunks], np.int32),
            token_ids=np.concatenate([c.token_ids for c in chunks]).astype(np.int32, copy=False),
            logprobs=np.concatenate([c.logprobs for c in chunks]).astype(np.float32, copy=False),
            top1_logprobs=np.concatenate([c.top1_logprobs for c in chunks]).astype(np.float32, copy=False),
            versions=np.concatenate([c.versions for c in chunks]).astype(np.int32, copy=False),
            prompt_lengths=np.array([len(p) for p in prompts], np.int32),
            prompt_token_ids=np.concatenate(prompts).astype(np.int32, copy=False),
        )


class StreamEnd(Message):
    """Sampler -> stopper/critic: no more tokens will come for this request."""

    KIND: ClassVar[str] = "stream_end"
    request_id: str
    sampler_id: str
    ending: Ending
    n_tokens: int


class ValueChunk(Message):
    """Critic -> stopper: V(s_t) for the listed response positions."""

    KIND: ClassVar[str] = "value_chunk"
    request_id: str
    positions: np.ndarray  # int32[n], increasing
    values: np.ndarray  # float32[n]
    critic_version: int

    def __post_init__(self) -> None:
        _check_1d("positions", self.positions, "iu")
        _check_1d("values", self.values, "f")
        _check_same_length(positions=self.positions, values=self.values)


class Cancel(Message):
    """Stopper -> owning sampler: the stop rule fired at ``stop_index``; abort the request."""

    KIND: ClassVar[str] = "cancel"
    request_id: str
    sampler_id: str
    stop_index: int
    reason: str = "stop_rule"
    z: float = 0.0  # smoothed regret when the rule fired (diagnostics)
    threshold: float = 0.0  # beta * max(V, eps) at that point
    decided_at: float = 0.0  # unix time of the decision (stop-latency measurements)

    def __post_init__(self) -> None:
        if self.stop_index < 0:
            raise ValueError(f"stop_index must be >= 0, got {self.stop_index}")


# --------------------------------------------------------------------------------------------
# Results: sampler -> learner (PUSH/PULL with backpressure)


class Trajectory(Message):
    """One finished, absorbed, truncated or incomplete rollout: exactly one per (prompt, sample).

    T-PPO windows (``rollout.window_tokens`` > 0): before that final trajectory (the whole
    response, ``offset`` 0), a training rollout also sends a *segment* every W tokens: ending
    ``incomplete``, ``token_ids`` = response tokens ``offset .. offset+W-1``, and
    ``prompt_token_ids`` = the prompt followed by response tokens ``0 .. offset-1`` (its prefix).
    See espo_async/training/tppo.py."""

    KIND: ClassVar[str] = "trajectory"
    request_id: str
    prompt_id: str
    sample_index: int
    group_size: int
    sampler_id: str
    prompt_token_ids: np.ndarray  # int32[P]
    token_ids: np.ndarray  # int32[T]
    logprobs: np.ndarray  # float32[T]
    top1_logprobs: np.ndarray  # float32[T]
    versions: np.ndarray  # int32[T]
    ending: Ending
    finish_reason: str  # what the engine said: "stop", "length", "abort", ...
    stop_index: int = -1  # >= 0 iff ending == "absorbed" (then T == stop_index + 1)
    tokens_generated: int = 0  # tokens the engine produced, incl. those discarded after a stop
    attempt: int = 0
    issued_at_version: int = 0
    started_at: float = 0.0  # unix time
    ended_at: float = 0.0
    text: str = ""  # detokenised response (for scoring and inspection)
    purpose: Purpose = "train"
    offset: int = 0  # T-PPO segment: response tokens before token_ids (the tail of prompt_token_ids)
    tag: bytes = b""  # the work's tag (PromptWork.tag), copied by the sampler

    @classmethod
    def answering(cls, work: PromptWork, **fields) -> Trajectory:
        """A trajectory (or T-PPO segment) of ``work``: its identity, attempt, issue version,
        purpose and tag copied from the work item; everything else from ``fields``."""
        return cls(request_id=work.request_id, prompt_id=work.prompt_id, sample_index=work.sample_index,
                   group_size=work.group_size, attempt=work.attempt, issued_at_version=work.issued_at_version,
                   purpose=work.purpose, tag=work.tag, **fields)

    def __post_init__(self) -> None:
        if self.offset < 0 or (self.offset > 0 and (self.ending != "incomplete"
                                                    or self.offset >= len(self.prompt_token_ids))):
            raise ValueError(
                f"offset={self.offset} needs an incomplete segment whose prefix holds the prompt and "
                f"{self.offset} response tokens ({len(self.prompt_token_ids)} prefix tokens, ending {self.ending})"
            )
        _check_1d("prompt_token_ids", self.prompt_token_ids, "iu")
        _check_token_arrays(token_ids=self.token_ids, logprobs=self.logprobs, top1_logprobs=self.top1_logprobs,
                            versions=self.versions)
        if self.ending == "absorbed":
            if self.stop_index < 0 or len(self.token_ids) != self.stop_index + 1:
                raise ValueError(
                    f"absorbed trajectory must hold tokens 0..stop_index: stop_index="
                    f"{self.stop_index}, {len(self.token_ids)} tokens"
                )
        elif self.stop_index != -1:
            raise ValueError(f"stop_index={self.stop_index} set on a {self.ending} trajectory")
        if self.tokens_generated < len(self.token_ids):
            raise ValueError(
                f"tokens_generated={self.tokens_generated} < {len(self.token_ids)} tokens kept"
            )


# --------------------------------------------------------------------------------------------
# Broadcasts: learner -> everyone (PUB/SUB; latest-state messages, re-sent periodically)


class StopParams(Message):
    """The frozen stop-rule state for the next batch (mirror of core ``StopSnapshot``)."""

    KIND: ClassVar[str] = "stop_params"
    kind: StopKind
    enabled: bool
    mu: float
    var: float
    c: float
    delta: float
    alpha_s: float
    beta: float
    eps: float
    hazard: float = 0.0
    value_ref: float = 0.0
    seed: int = 0
    step: int = 0  # learner step that produced it; it applies to rollouts started after


class BatchBoundary(Message):
    """Learner -> all: a training batch ended; here are its statistics and the new stop state."""

    KIND: ClassVar[str] = "batch_boundary"
    step: int
    policy_version: int
    total_steps: int
    stop: StopParams
    n_trajectories: int
    stop_rate: float
    regret_mean: float
    regret_var: float
    regret_count: int
    critic_loss: float
    groups_consumed: int = 0  # prompt groups the learner has taken so far (trained or dropped)
    epoch: str = ""  # id of the learner process that sent it; changes when the learner restarts


class EvalRequest(Message):
    """Learner -> coordinator: evaluate the policy of ``policy_version`` on held-out problems.

    Repeated until the learner has every result of the round; the coordinator issues each round
    once (rounds are identified by ``round``)."""

    KIND: ClassVar[str] = "eval_request"
    round: int
    policy_version: int
    n_problems: int
    samples: int
    temperature: float
    max_tokens: int


class WeightsAnnounced(Message):
    """Learner -> samplers/critic: new weights for ``model`` are ready at ``uri``."""

    KIND: ClassVar[str] = "weights_announced"
    model: Literal["policy", "critic"]
    version: int
    uri: str  # file:///... safetensors on shared storage, or collective://... (espo_async/weights/)
    sha256: str  # "" when not computed (the per-step weight sync skips it: see Learner._publish_weights)
    nbytes: int
    step: int = 0
    epoch: str = ""  # learner process id (see BatchBoundary.epoch): a new epoch may go back in version
    # (name, dtype, shape) of every tensor the learner broadcasts for this version, in order, when
    # ``uri`` is a collective:// version sent through the weight-update group (espo_async/weights/
    # collective.py); [] for files (and for a collective version that only has a file)
    tensors: list[tuple[str, str, list[int]]] = []


# --------------------------------------------------------------------------------------------
# Control: actors <-> supervisor


class Heartbeat(Message):
    """Any actor -> supervisor, every ``heartbeat_interval`` seconds."""

    KIND: ClassVar[str] = "heartbeat"
    actor: str
    role: str
    pid: int
    seq: int
    time: float
    status: ActorStatus
    counters: dict[str, float] = msgspec.field(default_factory=dict)


class Start(Message):
    """Supervisor -> all: every actor reported ready; the coordinator may hand out work."""

    KIND: ClassVar[str] = "start"
    actors: list[str] = msgspec.field(default_factory=list)


class Shutdown(Message):
    """Supervisor (or learner, when training is done) -> all: stop cleanly."""

    KIND: ClassVar[str] = "shutdown"
    reason: str
    source: str = ""


class ActorDown(Message):
    """Supervisor -> all: an actor process died or hung and is being restarted. Repeated while it
    is down; ``incarnation`` (0 = the first process of that actor) tells repeats from new losses."""

    KIND: ClassVar[str] = "actor_down"
    actor: str
    role: str
    incarnation: int
    reason: str = ""


class ActorUp(Message):
    """Supervisor -> all: a restarted actor process (``incarnation`` >= 1) is ready. Repeated a
    few times."""

    KIND: ClassVar[str] = "actor_up"
    actor: str
    role: str
    incarnation: int
    pid: int = 0


class Received(Message):
    """Learner -> coordinator (broadcast): the learner holds these requests' trajectories (in its
    write-ahead log, or already trained on). Work delivered but never acknowledged is issued
    again when its sampler or the learner restarts."""

    KIND: ClassVar[str] = "received"
    request_ids: list[str]
    epoch: str = ""


MESSAGE_TYPES: tuple[type[Message], ...] = (
    WorkRequest,
    SlotsQuery,
    PromptWork,
    WorkDone,
    TokenChunk,
    TokenBatch,
    StreamEnd,
    ValueChunk,
    Cancel,
    Trajectory,
    StopParams,
    BatchBoundary,
    EvalRequest,
    WeightsAnnounced,
    Heartbeat,
    Start,
    Shutdown,
    ActorDown,
    ActorUp,
    Received,
)
