"""The GRPO, DPO and SFT loops behind ``trlax train``.

Each loop: resolve the run config -> build / load the policy (:mod:`trlax.train.modeling`) and tokenizer
-> ``make_train_step`` over the mesh -> steps (each global batch drawn in the same order on every process,
tokenised per batch, by each process only for the rows it feeds: :meth:`_Run.rows`, :mod:`trlax.train.data`)
with logging and orbax checkpoints (resumable bit for bit: params, optimiser state, objective state, data
position and PRNG key are saved) -> export of the final policy in Hugging Face format -> summary.

Multi-host (``trlax launch`` / ``--distributed``): every process runs the same loop; batches become global
arrays from process-local rows (:meth:`_Run.place`); GRPO samples with one global program over every
process's prompts, scores the completions where their text is and gathers only the rewards; only process 0
writes logs, plots, the summary and the export; all processes write the orbax checkpoints.

Batches use one layout everywhere: a left-padded prompt block ``[B, P]`` followed by a right-padded
completion block ``[B, C]``; the loss sees per-token log-probs of the completion block only.

GRPO (Shao et al. 2024, arXiv 2402.03300, alg. 1) with TRL's schedule: every ``steps_per_generation x
num_iterations`` optimiser steps, ``steps_per_generation x batch_size`` completions are sampled
(``num_generations`` per prompt) with the current policy; rewards -> group advantages; the policy's
log-probs at generation time are kept as ``old_logps`` when training goes off-policy (``num_iterations >
1`` or ``steps_per_generation > 1``) or when a sampler correction is set; the frozen reference's log-probs
when ``beta > 0``; sampler log-probs for sampler-correction. The buffer is then consumed
``num_iterations`` times, one ``batch_size`` slice per optimiser step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trlax.train import data as D
from trlax.train.checkpoint import Checkpointer, key_from_meta, key_to_meta
from trlax.train.config import loss_config
from trlax.train.logging import RunLogger
from trlax.train.rewarding import REWARD_FUNCS, check_reward_fields, reward_functions, reward_model_scorer  # noqa: F401
from jax.sharding import NamedSharding, PartitionSpec

from trlax.train.step import BATCH_AXES, batch_totals, init_train_state, make_mesh, make_train_step, shard_state

# test hook: called as ``_after_step(run, step)`` after every round of optimiser steps has been logged and
# checkpointed (tests raise from it to simulate a run killed after step k).
_after_step: Optional[Callable[[int], None]] = None
# test hook: called as ``_on_first_step(run, state_before, batch, metrics)`` after the first optimiser step
# of a run (``state_before``: a copy of the TrainState the step started from; ``batch``: the host batch;
# ``metrics``: the step's metrics as floats). Tests recompute the objective from these directly.
_on_first_step: Optional[Callable[..., None]] = None


# ------------------------------------------------------------------------------------------ helpers


def save_config(algo: str, cfg) -> str:
    """Write the resolved config to ``<output_dir>/config.yaml`` (re-usable with ``--config``)."""
    import yaml

    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, "config.yaml")
    with open(path, "w") as fh:
        fh.write(f"# trlax train {algo} --config {path}\n")
        yaml.safe_dump(dataclasses.asdict(cfg), fh, sort_keys=False)
    return path


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter, arXiv 1711.05101) with optional linear warm-up and global-norm
    clipping (``max_grad_norm > 0``)."""
    lr = (optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps) if cfg.warmup_steps
          else cfg.learning_rate)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(lr, b1=0.9, b2=0.99, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def _host(x) -> np.ndarray:
    """A device array as a host NumPy array; on a multi-host run, arrays spread over other hosts' devices
    are gathered (``process_allgather``), replicated ones read from a local shard."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replicated(run, local: np.ndarray, n: int) -> jax.Array:
    """The ``[n, ...]`` global array of every process's :meth:`_Run.rows` ``local``, replicated on every device
    (for small host blocks such as a round's distinct prompts, which need not divide over the batch axes)."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    full = np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))  # process order = row order
    assert full.shape[0] == n, (full.shape, n)
    return jax.make_array_from_callback(full.shape, NamedSharding(run.mesh, PartitionSpec()), lambda i: full[i])


def _pack_round(rnd: Dict[str, Any]) -> Dict[str, Any]:
    """A generation round (host arrays and floats) as JSON for the checkpoint meta (arrays as base64 ``.npz``)."""
    import base64
    import io

    out = io.BytesIO()
    np.savez(out, lengths=rnd["lengths"], completion_mask=rnd["completion_mask"],
             **{"buf/" + k: np.asarray(v) for k, v in rnd["buf"].items()})
    return {"arrays": base64.b64encode(out.getvalue()).decode("ascii"), "metrics": rnd["metrics"],
            "version": rnd["version"]}


def _unpack_round(packed: Dict[str, Any]) -> Dict[str, Any]:
    import base64
    import io

    with np.load(io.BytesIO(base64.b64decode(packed["arrays"]))) as z:
        arrays = {k: z[k] for k in z.files}
    return {"buf": {k[4:]: v for k, v in arrays.items() if k.startswith("buf/")}, "lengths": arrays["lengths"],
            "completion_mask": arrays["completion_mask"], "metrics": dict(packed["metrics"]),
            "version": int(packed["version"])}


def _copy(tree):
    """A fresh copy of every array (the step donates the state's buffers; frozen copies must not alias)."""
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), tree)


class _Run:
    """State shared by the loops: policy, tokenizer, mesh, step function, checkpoints, logging."""

    def __init__(self, algo: str, cfg, loss_fn_builder, *, extra_state_fn=None, params_fn=None,
                 init_model: Optional[str] = None):
        """``loss_fn_builder(run) -> loss_fn`` (see :func:`trlax.train.step.make_train_step`);
        ``extra_state_fn(params) -> pytree``: objective state kept in ``TrainState.extra``;
        ``params_fn(policy) -> pytree of nnx.State``: the trainable parameters (default ``policy.params``;
        e.g. PPO's ``{"policy": ..., "value": ...}``)."""
        from trlax.train import modeling

        self.algo, self.cfg = algo, cfg
        self.is_main = jax.process_index() == 0
        ck_dir = os.path.join(cfg.output_dir, "checkpoints")
        if not cfg.resume and os.path.isdir(ck_dir) and any(d.isdigit() for d in os.listdir(ck_dir)):
            # before anything is written: another run's outputs are never overwritten
            raise ValueError(f"output_dir={cfg.output_dir!r} already holds checkpoints; pass --resume true to "
                             "continue or choose another output_dir")
        self.config_path = save_config(algo, cfg) if self.is_main else os.path.join(cfg.output_dir, "config.yaml")
        # init_model: a checkpoint to start from instead of cfg.model (GRPO's warm start; the saved config keeps
        # cfg.model, so that --config reruns the whole pipeline)
        self.policy = modeling.build_policy(dataclasses.replace(cfg, model=init_model) if init_model else cfg)
        self.tokenizer = self.policy.tokenizer
        self.mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
        dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if (cfg.batch_size // cfg.num_microbatches) % dp:
            raise ValueError(f"batch_size={cfg.batch_size} / num_microbatches={cfg.num_microbatches} must be "
                             f"divisible by the data-parallel size mesh_data x mesh_fsdp = {dp}")
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES))
        self.policy.place(self.mesh)  # LoRA: the frozen base weights, sharded like the parameters
        self.optimizer = make_optimizer(cfg)
        params = params_fn(self.policy) if params_fn else self.policy.params
        extra = extra_state_fn(params) if extra_state_fn else None
        state = init_train_state(params, self.optimizer, extra)
        self.state_sharding = self.policy.state_sharding(state, self.mesh, self.optimizer)
        self.state = shard_state(state, self.state_sharding)
        # initial policy = the reference model (with LoRA: the initial adapters, i.e. the base model; see
        # modeling.LoraPolicy; run.policy.reference_logps(run.frozen_params, ...) is the exact adapters-off path)
        self.frozen_params = _copy(self.state.params)
        self.loss_fn = loss_fn_builder(self)
        self._eval_fn = None
        self.step_fn = make_train_step(self.loss_fn, self.optimizer, mesh=self.mesh,
                                       state_sharding=self.state_sharding, num_microbatches=cfg.num_microbatches)
        self.ckpt = Checkpointer(os.path.join(cfg.output_dir, "checkpoints"),
                                 save_every=1, keep=cfg.keep_checkpoints)
        # trainable tree -> the policy parameters saved to <output_dir>/final (e.g. PPO: p["policy"])
        self.export_params: Callable[[Any], Any] = lambda p: p
        self.start_step = 0
        self.meta: Dict[str, Any] = {}
        history: List[Dict[str, float]] = []
        restored = self.ckpt.restore_latest(self.state) if cfg.resume else None  # skips unreadable ones
        if restored is not None:
            step, self.state, self.meta = restored
            self.start_step = int(step)
            history = _read_history(os.path.join(cfg.output_dir, "metrics.jsonl"), self.start_step,
                                    rewrite=self.is_main)
            print(f"resumed from step {self.start_step} in {self.ckpt.directory}")
        elif not cfg.resume and self.ckpt.latest_step() is not None:
            raise ValueError(f"output_dir={cfg.output_dir!r} already holds checkpoints; pass --resume to continue "
                             "or choose another output_dir")
        self.logger = RunLogger(cfg.output_dir, cfg.max_steps, progress=cfg.progress, start_step=self.start_step,
                                history=history, enabled=self.is_main)
        # non-finite steps (see make_train_step): counted, warned about once, a run of them stops the run
        self.skipped_steps = int(self.meta.get("skipped_steps", 0))
        self.consecutive_skips = int(self.meta.get("consecutive_skips", 0))
        self.last_skipped = False
        self._stop: Optional[Exception] = None
        D.truncated_prompts(reset=True)

    def train_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """One optimiser step on ``batch``: updates ``self.state``, returns the metrics as floats (global:
        the step reduces over the whole mesh). ``batch``: the global host batch (on a multi-host run every
        process holds it and contributes its own rows), or global arrays from :meth:`place`."""
        hook = _on_first_step if not getattr(self, "_stepped", False) else None
        before = _copy(self.state) if hook is not None else None
        self.state, m = self.step_fn(self.state, self.place(batch))
        metrics = _to_float(m)
        self._note_skip(metrics.pop("skipped", 0.0) > 0, metrics)
        metrics["truncated_prompts"] = float(D.truncated_prompts())  # distinct prompts cut to max_prompt_length
        self._stepped = True
        if hook is not None:
            hook(self, before, batch, metrics)
        return metrics

    def eval_loss(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """The objective's ``loss`` and metrics on a held-out host ``batch`` at the current parameters (no update;
        the batch's own token / row counts normalise it)."""
        if self._eval_fn is None:
            from trlax.objectives.aggregation import finalize_metrics

            fn = self.loss_fn

            def eval_fn(p, b):
                loss, m = fn(p, b, batch_totals(b))
                return loss, finalize_metrics(m)  # (sum, count) means -> values, as the train step logs them

            self._eval_fn = jax.jit(eval_fn)
        loss, m = self._eval_fn(self.state.params, batch)
        return dict(_to_float({k: v for k, v in m.items() if np.ndim(v) == 0}), loss=float(_host(loss)))

    def eval_batches(self, eval_rows, encode, step: int, weight_keys=None, derive=None) -> None:
        """Log (:meth:`RunLogger.log_eval`) the objective's loss and metrics on ``eval_rows``, in batches of
        ``batch_size`` rows (``encode(rows) -> host batch``), each batch's metrics weighted by its rows; the
        rows left over (``len(eval_rows) % batch_size``, or all of a smaller set) form one batch of their own
        shape (one more compile of the evaluation, no row counted twice: a batch filled up with repeats would
        weigh the repeats in its means); ``derive(metrics) -> dict``: metrics computed from the averaged ones
        (e.g. a margin from the chosen and rejected rewards)."""
        n, bs = len(eval_rows), self.cfg.batch_size
        sums: Dict[str, float] = {}
        for i in range(0, n, bs):
            sel = list(eval_rows[i:i + bs])
            m = self.eval_loss(encode(sel))
            w = len(sel) / n
            for k, v in m.items():
                if weight_keys is None or k in weight_keys:
                    sums[k] = sums.get(k, 0.0) + w * v
        if derive is not None:
            sums.update(derive(sums))
        self.logger.log_eval(step, sums)

    def due_eval(self, step: int, prev: int) -> bool:
        """Whether an evaluation is due after ``step`` (a round of steps since ``prev``): every ``eval_steps``
        and at the last step."""
        every = self.cfg.eval_steps
        return step == self.cfg.max_steps or (every > 0 and step // every > prev // every)

    def _note_skip(self, skipped: bool, metrics: Dict[str, float]) -> None:
        """Count a skipped (non-finite) step: ``skipped_steps`` in the metrics, one warning per run, and after
        ``max_consecutive_skips`` in a row a stop (raised by the next :meth:`maybe_checkpoint` once it has saved
        the state, which a skipped step leaves at the last good one)."""
        self.last_skipped = skipped
        if skipped:
            self.skipped_steps += 1
            self.consecutive_skips += 1
            if self.skipped_steps == 1:
                import warnings

                warnings.warn(f"trlax train {self.algo}: a step had a non-finite loss or gradient (loss="
                              f"{metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}) and was skipped: "
                              "parameters, optimiser and objective state are unchanged; further skips are only "
                              "counted in the `skipped_steps` metric", RuntimeWarning, stacklevel=3)
            limit = getattr(self.cfg, "max_consecutive_skips", 10)
            if self.consecutive_skips >= limit and self._stop is None:
                self._stop = NonFiniteError(
                    f"{self.consecutive_skips} consecutive steps had a non-finite loss or gradient "
                    f"(max_consecutive_skips={limit}; {self.skipped_steps} skipped in all); the last good state "
                    f"is saved in {self.ckpt.directory}; check the data, rewards and learning rate, then continue "
                    "with --resume true")
        else:
            self.consecutive_skips = 0
        metrics["skipped_steps"] = float(self.skipped_steps)

    def rows(self, n: Optional[int] = None) -> slice:
        """The rows of a global batch of ``n`` rows (default ``batch_size``) this process loads and feeds:
        everything with one process, a contiguous block per process on a multi-host run."""
        return D.local_slice(self.batch_sharding, self.cfg.batch_size if n is None else n)

    def place(self, batch: Dict[str, Any], local: bool = False, n: Optional[int] = None) -> Dict[str, Any]:
        """Host batch -> step input. One process: unchanged (jit places it). Multi-host: global arrays built
        with ``jax.make_array_from_process_local_data`` from this process's rows only: ``local=True``: the
        batch *is* those rows (of a global batch of ``n`` rows, default ``batch_size``); else the batch is
        global and only its :meth:`rows` are transferred."""
        if jax.process_count() == 1:
            return batch
        out, local_cols = {}, {}
        for k, v in batch.items():
            if isinstance(v, jax.Array) and not v.is_fully_addressable:
                out[k] = v
            elif local:
                local_cols[k] = v
            else:
                rows = np.shape(v)[0]
                out.update(D.global_batch(self.batch_sharding, {k: np.asarray(v)[self.rows(rows)]}, rows))
        if local_cols:
            out.update(D.global_batch(self.batch_sharding, local_cols, self.cfg.batch_size if n is None else n))
        return out

    def local(self, x, n: Optional[int] = None) -> np.ndarray:
        """This process's :meth:`rows` of the global array ``x`` (``n`` rows, default ``x.shape[0]``) as
        NumPy, read from its own shards (all of ``x`` with one process)."""
        n = x.shape[0] if n is None else n
        if isinstance(x, jax.Array) and not x.is_fully_addressable and x.sharding != self.batch_sharding:
            x = jax.device_put(x, self.batch_sharding)
        return D.local_rows(x, self.rows(n))

    def gather(self, local, n: int) -> np.ndarray:
        """The global ``[n, ...]`` host array from every process's :meth:`rows` ``local`` (all processes get it)."""
        return D.gather_rows(self.batch_sharding, local, n)

    def export(self, params, path: str) -> None:
        params = jax.tree_util.tree_map(_host, params)  # collective on multi-host: every process calls it
        if self.is_main:
            self.policy.save(params, path)

    def maybe_checkpoint(self, step: int, meta: Dict[str, Any], prev_step: Optional[int] = None) -> None:
        """Save at multiples of ``save_every`` (or when a round of steps crossed one) and at the end."""
        prev = step - 1 if prev_step is None else prev_step
        every = self.cfg.save_every
        due = step == self.cfg.max_steps or (every > 0 and step // every > prev // every)
        if due or self._stop is not None:  # ``meta``: a dict, or a function that makes it (called only when due)
            meta = dict(meta() if callable(meta) else meta, skipped_steps=self.skipped_steps,
                        consecutive_skips=self.consecutive_skips)
            self.ckpt.save(step, self.state, meta, force=True)
        if self._stop is not None:  # max_consecutive_skips non-finite steps: the last good state is saved above
            self.ckpt.close()
            self.logger.close()
            raise self._stop
        if _after_step is not None:
            _after_step(self, step)

    def finish(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        self.ckpt.close()
        plot = self.logger.plot() if self.cfg.plot else None
        self.logger.close()
        if self.cfg.export:
            path = os.path.join(self.cfg.output_dir, "final")
            self.export(self.export_params(self.state.params), path)
            summary["exported_to"] = path
        summary["config"] = self.config_path
        summary["metrics"] = self.logger.jsonl_path
        if plot:
            summary["plot"] = plot
        if self.is_main:
            with open(os.path.join(self.cfg.output_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            print(json.dumps(summary, indent=2))
            if getattr(self, "summary_line", ""):  # the run's headline (GRPO: reward and held-out accuracy)
                print(self.summary_line, flush=True)
        return summary


class NonFiniteError(RuntimeError):
    """``max_consecutive_skips`` steps in a row had a non-finite loss or gradient: the run stops (its last good
    state checkpointed)."""


def _read_history(path: str, upto: int, rewrite: bool = True) -> List[Dict[str, float]]:
    if not os.path.exists(path):
        return []
    rows = {}
    with open(path) as fh:
        for line in fh:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if r.get("step", upto + 1) <= upto:
                rows[r["step"], r.get("split", "")] = r  # an evaluation row shares its step with a training row
    if not rewrite:  # multi-host: process 0 owns the file
        return [rows[k] for k in sorted(rows)]
    with open(path, "w") as fh:  # drop rows of steps that will be redone
        for k in sorted(rows):
            fh.write(json.dumps(rows[k]) + "\n")
    return [rows[k] for k in sorted(rows)]


def first_last(values, frac: float = 0.1):
    """Means of the first and last ``frac`` of ``values`` (at least one element each)."""
    values = np.asarray(values, float)
    n = max(1, int(round(len(values) * frac)))
    return float(np.nanmean(values[:n])), float(np.nanmean(values[-n:]))


def eval_records(algo: str, cfg, rows, multi_process: bool = False):
    """``(train_rows, eval_rows)``: ``eval_rows`` from ``cfg.eval_dataset`` (read and checked like the training
    set), or the held-out ``cfg.eval_split`` of ``rows`` (whole prompts, :func:`trlax.train.data.split_by_prompt`),
    or None (no evaluation). ``multi_process``: the trainer evaluates on multi-host runs too (GRPO); the others
    refuse there."""
    single = multi_process or jax.process_count() == 1
    if getattr(cfg, "eval_dataset", ""):
        if not single:
            raise ValueError(f"eval_dataset={cfg.eval_dataset!r}: {algo}'s evaluation runs in one process for now")
        return rows, D.load_records(algo, cfg.eval_dataset, seed=cfg.seed)
    if getattr(cfg, "eval_split", 0.0) > 0:
        if not single:
            raise ValueError(f"eval_split={cfg.eval_split}: {algo}'s evaluation runs in one process for now")
        return D.split_by_prompt(rows, cfg.eval_split, cfg.seed)
    return rows, None


def eval_first_last(run, key: str):
    """``(first, last)`` of the evaluation metric ``key`` (``eval/<key>``), NaN when not evaluated."""
    vals = [r[f"eval/{key}"] for r in run.logger.eval_history if f"eval/{key}" in r]
    return (float(vals[0]), float(vals[-1])) if vals else (float("nan"), float("nan"))


def accuracy_column(reward_names) -> Optional[int]:
    """The index of the correctness reward (``accuracy`` / ``exact_match``) among ``reward_names``, or None."""
    return next((j for j, n in enumerate(reward_names) if n in ("accuracy", "exact_match")), None)


def sample_eval(run, sampler, reward_fn, reward_names, weights, eval_rows, step: int, *, k: int, n_prompts: int,
                params=None) -> Dict[str, float]:
    """Held-out evaluation of an RL trainer's policy (``params``, default ``run.state.params``): ``k``
    completions of every row of ``eval_rows`` sampled by ``sampler`` as in training (the run's temperature /
    top-k / top-p, a fixed key), in batches of ``n_prompts`` prompts (the training round's, so the sampling
    program is the one already compiled; the last batch filled up from the start, the repeats dropped), scored
    by ``reward_fn``. Logs (:meth:`RunLogger.log_eval`) and returns the mean weighted reward, each reward
    function's mean (``rewards/<name>``) and, with an ``accuracy`` / ``exact_match`` reward, ``accuracy`` (the
    fraction of correct completions: pass@1) and ``pass@k`` (the fraction of prompts with a correct completion).
    Used by grpo, rloo, ppo and a2po. Multi-host (GRPO): every process holds the same ``eval_rows``; each batch is
    one global sampling program over every process's block of its prompts (as in training), each process scores
    its own completions, and the rewards are gathered, so every process logs the same figures."""
    cfg, tok = run.cfg, run.tokenizer
    sp, n = run.policy.sampler_params(run.state.params if params is None else params), len(eval_rows)
    multi = jax.process_count() > 1
    Rs = []
    for i in range(0, n, n_prompts):
        sel = [eval_rows[j % n] for j in range(i, i + n_prompts)]
        p_ids, p_mask = D.encode_left_padded(tok, _texts(tok, sel, "prompt"), cfg.max_prompt_length)
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed + 1), i)
        c_sl = run.rows(n_prompts * k)  # this process's completions: whole groups of k (as in training) ...
        loc = np.arange(c_sl.start // k, c_sl.stop // k)  # ... and their prompts (all with one process)
        if multi:
            g = _replicated(run, np.concatenate([p_ids[loc], p_mask[loc]], 1), n_prompts)
            roll = sampler.generate_global(sp, g[:, :p_ids.shape[1]], g[:, p_ids.shape[1]:] > 0, key, num_generations=k)
        else:
            roll = sampler.generate(sp, (p_ids, p_mask), key, num_generations=k)
        c_ids, c_mask, trunc = run.local(roll.completion_ids), run.local(roll.completion_mask), run.local(roll.truncated)
        comp = [c_ids[b][c_mask[b]].tolist() for b in range(c_ids.shape[0])]
        grows = [sel[j] for j in np.repeat(loc, k)]
        R = reward_fn(tok.batch_decode(comp, skip_special_tokens=True), comp,
                      [str(r["prompt"]) for r in grows], grows, trunc)
        if multi:
            R = run.gather(np.asarray(R, np.float64), n_prompts * k)  # every process's completions, in row order
        Rs.append(R[: min(n_prompts, n - i) * k])
    R = np.concatenate(Rs)
    out = {"reward": float(np.mean(np.nansum(R * np.asarray(weights), axis=1)))}
    acc_col = accuracy_column(reward_names)
    if acc_col is not None:
        correct = (np.nan_to_num(R[:, acc_col]) > 0).reshape(n, k)
        out["accuracy"], out[f"pass@{k}"] = float(correct.mean()), float(correct.any(1).mean())
    for j, name in enumerate(reward_names):
        out[f"rewards/{name}"] = float(np.nanmean(R[:, j]))
    run.logger.log_eval(step, out)
    return out


def sample_eval_rows(eval_rows, run, algo: str, single_turn: bool = True, multi_process: bool = False):
    """Each distinct evaluation row once; refuses what :func:`sample_eval` does not run (multi-turn rollouts;
    multi-process runs unless ``multi_process``: GRPO)."""
    if (jax.process_count() > 1 and not multi_process) or not single_turn:
        raise ValueError(f"held-out evaluation (eval_dataset / eval_split) of {algo} runs in one process and with "
                         "single-turn rollouts for now")
    return list({repr(r): r for r in eval_rows}.values())


def sample_eval_summary(run, summary: Dict[str, Any], eval_rows, k: int, has_accuracy: bool) -> str:
    """Adds ``eval_{reward, accuracy, pass@k}_{first, last}`` and ``eval_prompts`` to ``summary``; returns the
    text the final line appends (the held-out accuracy first -> last, when there is an accuracy reward)."""
    for key in ("reward", "accuracy", f"pass@{k}"):
        summary[f"eval_{key}_first"], summary[f"eval_{key}_last"] = eval_first_last(run, key)
    summary["eval_prompts"] = len(eval_rows)
    if not has_accuracy:
        return ""
    return (f"; held-out accuracy ({len(eval_rows)} prompts not trained on, {k} sampled completions each): "
            f"{summary['eval_accuracy_first']:.3f} -> {summary['eval_accuracy_last']:.3f}")


def _texts(tok, rows, col):
    return D.column_texts(tok, rows, col)  # TRL's rendering of conversational rows (generation prompt ...)


def _to_float(m) -> Dict[str, float]:
    return {k: float(_host(v)) for k, v in m.items()}


# --------------------------------------------------------------------------------------------- SFT


def pack_examples(P_ids, P_mask, C_ids, C_mask, max_length: int, strategy: str, pad_id: int):
    """SFT packing (:func:`trlax.models.packing.pack_sequences`; BFD / ``bfd_split``: arXiv 2404.10830,
    wrapped: T5, arXiv 1910.10683 sec. 3.1.2): each example is its prompt tokens followed by its completion
    tokens (the same tokens as the unpacked ``[B, P] + [B, C]`` layout), the loss mask on the completion
    tokens only (completion-only loss); rows get segment ids so packed examples never attend to each other."""
    from trlax.models.packing import pack_sequences

    seqs, masks = [], []
    for i in range(P_ids.shape[0]):
        p, c = P_ids[i][P_mask[i].astype(bool)], C_ids[i][C_mask[i].astype(bool)]
        seqs.append(np.concatenate([p, c]).astype(np.int32))
        masks.append(np.concatenate([np.zeros(len(p), bool), np.ones(len(c), bool)]))
    return pack_sequences(seqs, max_length, strategy, loss_masks=masks, pad_id=pad_id)


def run_sft(cfg, rows=None, algo: str = "sft") -> Dict[str, Any]:
    """Supervised fine-tuning: NLL or DFT (arXiv 2508.05629, eq. 9) through
    :func:`trlax.objectives.sft_loss`, normalised by the global count of target tokens; optional BEMA
    (arXiv 2508.00180) weights kept in the train state and exported to ``final_bema``.

    ``packing`` (``bfd`` | ``bfd_split`` | ``wrapped``): the data set is packed once up front into rows of
    ``max_length`` tokens (:func:`pack_examples`); a batch is ``batch_size`` packed rows, the forward is
    segment-aware (:meth:`Policy.packed_logps`), the loss mask is the completion tokens and the loss is
    normalised by the batch's real target tokens (TRL: packing changes only which tokens share a row)."""
    from trlax.objectives.supervised import bema, sft_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows)
    bema_tx = bema(update_freq=cfg.bema_update_freq) if cfg.bema else None
    packing = getattr(cfg, "packing", "")
    if packing and eval_rows is not None:
        raise ValueError(f"packing={packing!r}: held-out evaluation (eval_dataset / eval_split) runs on unpacked rows "
                         "only for now; pass --packing '' or leave evaluation off")

    smoothing = getattr(cfg, "label_smoothing_factor", 0.0)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            if packing:
                logps, _ = run.policy.packed_logps(params, b["input_ids"], b["segment_ids"], b["positions"], b["mask"])
            elif smoothing:  # the uniform-target term needs the full [B, C, V] logits
                from flax import nnx

                from trlax.train.distill import _token_logps, completion_logits

                logits = completion_logits(nnx.merge(*run.policy._model(params)), b["prompt_ids"], b["prompt_mask"],
                                           b["completion_ids"], b["mask"])
                return sft_loss(_token_logps(logits, b["completion_ids"], b["mask"]), b["mask"],
                                loss_type=cfg.loss_type, num_items=totals["num_items"], label_smoothing=smoothing,
                                logits=logits)
            else:
                logps, _ = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"],
                                                       b["completion_ids"], b["mask"])
            return sft_loss(logps, b["mask"], loss_type=cfg.loss_type, num_items=totals["num_items"])
        return loss_fn

    run = _Run(algo, cfg, loss_builder, extra_state_fn=(lambda p: _copy(bema_tx.init(p))) if bema_tx else None)
    tok = run.tokenizer
    bema_step = jax.jit(lambda p, s: bema_tx.update(p, s)[1]) if bema_tx else None
    if packing:  # packing needs the whole data set: every process packs it (same rows), then feeds its block
        P_ids, P_mask = D.encode_left_padded(tok, _texts(tok, rows, "prompt"), cfg.max_prompt_length)
        C_ids, C_mask = D.encode_right_padded(tok, _texts(tok, rows, "completion"), cfg.max_completion_length)
        L = cfg.max_length or cfg.max_prompt_length + cfg.max_completion_length
        packed = pack_examples(P_ids, P_mask, C_ids, C_mask, L, packing, tok.pad_token_id)
        cols = {"input_ids": packed.input_ids, "segment_ids": packed.segment_ids, "positions": packed.positions,
                "mask": packed.loss_mask}
        print(f"packing ({packing}): {len(rows)} examples -> {packed.input_ids.shape[0]} rows of {L} tokens")
        n_rows = len(cols["mask"])
    else:
        n_rows = len(rows)

    def encode(sel):
        p_ids, p_mask = D.encode_left_padded(tok, _texts(tok, sel, "prompt"), cfg.max_prompt_length)
        c_ids, c_mask = D.encode_right_padded(tok, _texts(tok, sel, "completion"), cfg.max_completion_length)
        return {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "mask": c_mask}

    def local_batch(idx):
        """This process's rows of the global batch ``idx`` (tokenised here, only those rows)."""
        loc = idx[run.rows()]
        if packing:
            return {k: v[loc] for k, v in cols.items()}
        return encode([rows[i] for i in loc])

    def evaluate(step):  # held-out loss (the run's objective, token mean over each batch's completions)
        run.eval_batches(eval_rows, encode, step, weight_keys=("loss",))

    if eval_rows is not None and run.start_step == 0:
        evaluate(0)
    sampler = D.EpochSampler(n_rows, cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        batch = local_batch(sampler.next())
        m = run.train_step(run.place(batch, local=True))  # this process's rows -> global arrays
        if bema_step is not None and not run.last_skipped:  # a skipped step leaves the objective state too
            run.state = run.state._replace(extra=bema_step(run.state.params, run.state.extra))
        run.logger.log(step, m, tokens=int(D.all_sum(batch["mask"].sum())[0]))
        if eval_rows is not None and run.due_eval(step, step - 1):
            evaluate(step)
        run.maybe_checkpoint(step, {"data": sampler.state()})
    losses = [r["loss"] for r in run.logger.history]
    first, last = first_last(losses)
    print(f"mean loss: first 10% of steps {first:.4f} -> last 10% {last:.4f}")
    summary = {"algorithm": algo, "loss_type": cfg.loss_type, "steps": cfg.max_steps,
               "loss_first_10pct": first, "loss_last_10pct": last}
    if eval_rows is not None:
        summary["eval_loss_first"], summary["eval_loss_last"] = eval_first_last(run, "loss")
        print(f"held-out loss ({len(eval_rows)} rows): {summary['eval_loss_first']:.4f} -> "
              f"{summary['eval_loss_last']:.4f}")
    if packing:
        summary["packing"] = packing
    if bema_tx is not None and cfg.export:
        path = os.path.join(cfg.output_dir, "final_bema")
        run.export(run.state.extra.bema, path)
        summary["bema_exported_to"] = path
    return run.finish(summary)


# --------------------------------------------------------------------------------------------- DPO


def run_dpo(cfg, rows=None, algo: str = "dpo") -> Dict[str, Any]:
    """DPO family (arXiv 2305.18290, eq. 7, and every ``PreferenceLossConfig`` variant) on a preference
    set; reference log-probs from the frozen initial policy (with LoRA: the base model, adapters off),
    computed once up front (``precompute_ref_logps``) or on the fly for each batch.

    TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656, eqs. 5-6; ``sync_ref_model``): the reference
    parameters live in ``TrainState.extra`` (so checkpoints hold them and a resumed run is exact); after
    every optimiser step ``k`` with ``k % ref_model_sync_steps == 0`` they become
    ``α·θ + (1 − α)·θ_ref`` (``ref_model_mixup_alpha``; :func:`trlax.objectives.trdpo_ref_update`), and
    the reference log-probs are computed on the fly from them (``precompute_ref_logps`` does not apply).
    With LoRA the mixed parameters are the adapters."""
    from trlax.objectives.preference import preference_loss
    from trlax.objectives.unpaired import trdpo_ref_update

    lcfg = loss_config(algo, cfg)
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows)
    needs_ref = not lcfg.reference_free
    sync = bool(getattr(cfg, "sync_ref_model", False)) and needs_ref

    def loss_builder(run):
        def loss_fn(params, b, totals):
            n = b["chosen_ids"].shape[0]
            p_ids = jnp.concatenate([b["prompt_ids"]] * 2, 0)
            p_mask = jnp.concatenate([b["prompt_mask"]] * 2, 0)
            c_ids = jnp.concatenate([b["chosen_ids"], b["rejected_ids"]], 0)
            c_mask = jnp.concatenate([b["chosen_mask"], b["rejected_mask"]], 0)
            logps, _ = run.policy.completion_logps(params, p_ids, p_mask, c_ids, c_mask)
            return preference_loss(logps[:n], logps[n:], b.get("ref_chosen"), b.get("ref_rejected"),
                                   b["chosen_mask"], b["rejected_mask"], lcfg,
                                   num_pairs=totals["num_sequences"], num_chosen_tokens=totals["num_items"])
        return loss_fn

    run = _Run(algo, cfg, loss_builder, extra_state_fn=_copy if sync else None)
    tok = run.tokenizer
    frozen = run.frozen_params

    def encode(idx):
        """The token columns of rows ``idx`` (a process tokenises only the rows it feeds)."""
        return encode_rows([rows[i] for i in idx])

    def encode_rows(sel):
        p_ids, p_mask = D.encode_left_padded(tok, _texts(tok, sel, "prompt"), cfg.max_prompt_length)
        ch_ids, ch_mask = D.encode_right_padded(tok, _texts(tok, sel, "chosen"), cfg.max_completion_length)
        rj_ids, rj_mask = D.encode_right_padded(tok, _texts(tok, sel, "rejected"), cfg.max_completion_length)
        return {"prompt_ids": p_ids, "prompt_mask": p_mask, "chosen_ids": ch_ids, "chosen_mask": ch_mask,
                "rejected_ids": rj_ids, "rejected_mask": rj_mask, "mask": ch_mask}

    @jax.jit
    def ref_logps(p_ids, p_mask, c_ids, c_mask):
        return run.policy.reference_logps(frozen, p_ids, p_mask, c_ids, c_mask)[0]

    if sync:
        alpha, every = float(cfg.ref_model_mixup_alpha), int(cfg.ref_model_sync_steps)
        ref_sync = jax.jit(lambda ref, p, k: trdpo_ref_update(ref, p, k, alpha=alpha, sync_steps=every),
                           out_shardings=run.state_sharding.extra)
        synced_logps = jax.jit(lambda ref, *a: run.policy.completion_logps(ref, *a)[0])

        def ref_logps(p_ids, p_mask, c_ids, c_mask):  # noqa: F811 - the synced reference in TrainState.extra
            return synced_logps(run.state.extra, p_ids, p_mask, c_ids, c_mask)

    def refs(b):
        """Reference log-probs of this process's rows ``b`` (a global forward over every process's rows)."""
        g = run.place(b, local=True)
        return (ref_logps(g["prompt_ids"], g["prompt_mask"], g["chosen_ids"], g["chosen_mask"]),
                ref_logps(g["prompt_ids"], g["prompt_mask"], g["rejected_ids"], g["rejected_mask"]))

    ref_ch = ref_rj = None
    if needs_ref and cfg.precompute_ref_logps and not sync:
        # the whole table, in global batches of batch_size (each process tokenises its block of each),
        # gathered on every process: any row may land in any process's block in a later epoch
        bs = cfg.batch_size
        pad = (-len(rows)) % bs
        order = np.concatenate([np.arange(len(rows)), np.zeros(pad, int)])
        outs_c, outs_r = [], []
        for i in range(0, len(order), bs):
            c, r = refs(encode(order[i:i + bs][run.rows()]))
            outs_c.append(_host(c))
            outs_r.append(_host(r))
        ref_ch = np.concatenate(outs_c)[: len(rows)]
        ref_rj = np.concatenate(outs_r)[: len(rows)]

    def eval_batch(sel):
        """Held-out rows with their reference log-probs (always computed on the fly, from the reference)."""
        b = encode_rows(sel)
        if needs_ref:
            b["ref_chosen"], b["ref_rejected"] = map(_host, refs(b))
        return b

    def evaluate(step):  # held-out implicit-reward accuracy and margin (and the loss), as the training metrics
        run.eval_batches(eval_rows, eval_batch, step,
                         weight_keys=("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                      "rewards/rejected"))

    if eval_rows is not None and run.start_step == 0:
        evaluate(0)
    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        loc = sampler.next()[run.rows()]
        batch = encode(loc)
        if needs_ref:
            if ref_ch is not None:
                batch["ref_chosen"], batch["ref_rejected"] = ref_ch[loc], ref_rj[loc]
            else:
                c, r = refs(batch)
                batch["ref_chosen"], batch["ref_rejected"] = run.local(c), run.local(r)
        m = run.train_step(run.place(batch, local=True))  # this process's rows -> global arrays
        if sync:  # (a skipped step leaves the objective state too)
            if not run.last_skipped:
                run.state = run.state._replace(extra=ref_sync(run.state.extra, run.state.params, step))
            m["ref_synced"] = float(step % every == 0)
        tokens = D.all_sum(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())[0]
        run.logger.log(step, m, tokens=int(tokens))
        if eval_rows is not None and run.due_eval(step, step - 1):
            evaluate(step)
        run.maybe_checkpoint(step, {"data": sampler.state()})
    hist = run.logger.history
    first, last = first_last([r["loss"] for r in hist])
    a_first, a_last = first_last([r.get("rewards/accuracies", np.nan) for r in hist])
    print(f"mean loss: first 10% of steps {first:.4f} -> last 10% {last:.4f}; "
          f"reward accuracy {a_first:.3f} -> {a_last:.3f}")
    summary = {"algorithm": algo, "loss_type": list(lcfg.loss_types) if hasattr(lcfg, "loss_types")
               else lcfg.loss_type, "steps": cfg.max_steps, "loss_first_10pct": first,
               "loss_last_10pct": last, "accuracy_first_10pct": a_first, "accuracy_last_10pct": a_last}
    if eval_rows is not None:
        for key, name in (("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")):
            summary[f"eval_{name}_first"], summary[f"eval_{name}_last"] = eval_first_last(run, key)
        print(f"held-out reward accuracy ({len(eval_rows)} pairs): {summary['eval_accuracy_first']:.3f} -> "
              f"{summary['eval_accuracy_last']:.3f}; margin {summary['eval_margin_first']:.3f} -> "
              f"{summary['eval_margin_last']:.3f}")
    return run.finish(summary)


# -------------------------------------------------------------------------------------------- GRPO


# The default job (`trlax train grpo`: the built-in task and tiny model) resolves the auto (-1) fields to these:
# a warm start on the answer format, then GRPO, evaluated on held-out prompts.
DEFAULT_JOB = dict(sft_warmup_steps=30, eval_split=0.1)


def resolve_auto(algo: str, cfg):
    """``cfg`` with its auto (``-1``) ``sft_warmup_steps`` / ``eval_split`` resolved: :data:`DEFAULT_JOB`'s values
    for ``trlax train grpo`` on the built-in task with the built-in tiny model (single-turn), else 0."""
    from trlax.train.agentic import uses_environment

    default_job = algo == "grpo" and cfg.dataset == "builtin" and cfg.model == "tiny" and not uses_environment(cfg)
    auto = {k: (v if default_job else 0) for k, v in DEFAULT_JOB.items() if getattr(cfg, k, None) == -1}
    if auto.get("eval_split") and cfg.eval_dataset:
        auto["eval_split"] = 0.0
    return dataclasses.replace(cfg, **auto) if auto else cfg


# the fraction of the warm start's demonstrations that show the prompt's own answer (the others: another row's).
# With none (every answer another row's), GRPO on the default job stalls at ~0.76 held-out accuracy: the policy
# sharpens onto the frequent answers (the largest of three digits is >= 5 in 87.5% of prompts) before it
# conditions on the prompt, and prompts whose answer it never samples give no signal (README, Set up and run).
# 30% leaves the warm-start model near chance on held-out prompts (0.13) but conditioned enough to explore.
WARMUP_CORRECT_FRACTION = 0.3

# fields of a GRPO run config that its warm-start SFT stage takes over unchanged
_WARMUP_FIELDS = ("model", "seed", "batch_size", "learning_rate", "weight_decay", "max_grad_norm", "max_prompt_length",
                  "max_completion_length", "mesh_data", "mesh_fsdp", "mesh_tensor", "param_dtype", "compute_dtype",
                  "attention_impl", "remat", "progress", "lora_rank", "lora_alpha", "lora_target_modules", "use_dora",
                  "use_rslora")


def format_warmup(cfg, rows) -> str:
    """R1-style cold start (DeepSeek-R1, arXiv 2501.12948, sec. 2.3.1: a short SFT stage before RL):
    ``cfg.sft_warmup_steps`` steps of :func:`run_sft` that teach the *answer format*, not the task. Each
    training prompt is paired with its own ``answer`` (or ``solution``) with probability
    :data:`WARMUP_CORRECT_FRACTION` and otherwise with the answer of another row drawn at random, so the model
    learns to reply with one of the task's answers and EOS whatever the prompt, with at most a slight lean
    towards the right one (the default job: held-out accuracy 0.13 after it, chance 0.12); which answer is
    right is left to GRPO. Runs in ``<output_dir>/warmup``; returns its Hugging Face export, the model GRPO then
    starts from (and its reference model). A resumed run (``resume=True``) reuses a finished warm start."""
    import random

    from trlax.train.config import build_config

    out = os.path.join(cfg.output_dir, "warmup")
    final = os.path.join(out, "final")
    if cfg.resume and os.path.isfile(os.path.join(final, "config.json")):
        return final
    answers = [r.get("answer", r.get("solution")) for r in rows]
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        raise ValueError(f"sft_warmup_steps={cfg.sft_warmup_steps}: the warm start replies with the data set's answers, "
                         f"but dataset={cfg.dataset!r}, row {missing[0]} has no 'answer' / 'solution' column; pass "
                         "--sft_warmup_steps 0")
    rng = random.Random(cfg.seed)
    sft_rows = []
    for r, a in zip(rows, answers, strict=True):  # its own answer with probability WARMUP_CORRECT_FRACTION
        shown = a if rng.random() < WARMUP_CORRECT_FRACTION else answers[rng.randrange(len(rows))]
        sft_rows.append({"prompt": r["prompt"], "completion": str(shown).strip()})
    values = {k: getattr(cfg, k) for k in _WARMUP_FIELDS}
    values.update(output_dir=out, max_steps=cfg.sft_warmup_steps, resume=False, export=True,
                  max_consecutive_skips=cfg.max_consecutive_skips)
    if os.path.isdir(os.path.join(out, "checkpoints")) and jax.process_index() == 0:  # a killed run's: start over
        import shutil

        shutil.rmtree(out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("trlax warm start: clean")
    if jax.process_index() == 0:
        print(f"warm start: {cfg.sft_warmup_steps} SFT steps on the answer format ({WARMUP_CORRECT_FRACTION:.0%} of "
              f"the answers right, the others another row's) -> {final}", flush=True)
    run_sft(build_config("sft", values), sft_rows)
    if jax.process_count() > 1:  # process 0 wrote the export: every process loads it next
        multihost_utils.sync_global_devices("trlax warm start: exported")
    return final


def run_grpo(cfg, rows=None, algo: str = "grpo") -> Dict[str, Any]:
    """GRPO family: every ``PolicyLossConfig`` loss / preset (see the module docstring for the schedule).

    Adaptive entropy control (Skywork-OR1, He et al. 2025, arXiv 2505.22312, sec. 3.2.3; TRL
    ``use_adaptive_entropy``): the entropy-bonus coefficient ``c`` (starting at ``entropy_coef``) is host
    state saved in the checkpoint meta (a resumed run is exact). At optimiser step ``k`` the loss uses
    ``c_k`` if the previous step's entropy ``H_{k-1} ≤ entropy_target`` else 0 (no bonus at the first step,
    ``H_0 = +∞``); after the step ``c_{k+1} = adaptive_entropy_coef(c_k, H_k, ...)`` (``+δ`` if
    ``H_k ≤ target`` else ``−δ``, clipped to ``[entropy_coef_min, entropy_coef_max]``), with ``H_k`` the
    step's logged ``entropy`` (token mean over the loss mask). The applied value reaches the jitted loss as
    the batch column ``entropy_coef``; the loss is ``policy_loss`` with the bonus scaled by it (logged:
    ``entropy_coef``, ``entropy_coef_applied``)."""
    from trlax.objectives import multi_reward_advantages, policy_loss
    from trlax.objectives.policy import adaptive_entropy_coef
    from trlax.rollouts import JaxSampler, SamplingConfig
    from trlax.train.agentic import AgentRollouts, environment_rows, uses_environment, warm_start as agentic_warm_start

    lcfg = loss_config(algo, cfg)
    adaptive = bool(getattr(cfg, "use_adaptive_entropy", False))
    if adaptive:  # the bonus is linear in its coefficient: loss(c) = loss(0) + c·(loss(1) − loss(0))
        lcfg0, lcfg1 = (dataclasses.replace(lcfg, entropy_coef=c) for c in (0.0, 1.0))
    cfg = resolve_auto(algo, cfg)
    if rows is None and uses_environment(cfg):  # an environment's own built-in task (CalculatorEnv: addition)
        rows = environment_rows(cfg)
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows, multi_process=True)
    # R1-style cold start on the answer format: GRPO starts from (and is regularised towards) its export
    # (multi-turn runs: on the environment's demonstration transcripts, trlax.train.agentic.warm_start)
    warmup = agentic_warm_start if uses_environment(cfg) else format_warmup
    init_model = warmup(cfg, rows) if getattr(cfg, "sft_warmup_steps", 0) > 0 else None
    G = cfg.num_generations
    spg, n_iter = cfg.steps_per_generation, cfg.num_iterations
    gen_rows = cfg.batch_size * spg
    n_prompts = gen_rows // G

    def loss_builder(run):
        def loss_fn(params, b, totals):
            # multi-turn rollouts: attend over policy + observation tokens, the loss only over the policy's (mask)
            logps, ent = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                     b.get("attention_mask", b["mask"]), temperature=cfg.temperature)

            def objective(config):
                return policy_loss(logps, b.get("old_logps"), b["advantages"], b["mask"], config,
                                   ref_logps=b.get("ref_logps"), sampler_logps=b.get("sampler_logps"),
                                   entropies=ent, num_items=totals["num_items"],
                                   num_sequences=totals["num_sequences"], truncated=b.get("truncated"))
            if not adaptive:
                return objective(lcfg)
            loss0, metrics = objective(lcfg0)
            loss1, _ = objective(lcfg1)
            coef = jnp.max(b["entropy_coef"])  # one value per batch, a column so that it is sharded / split
            return loss0 + coef.astype(loss0.dtype) * (loss1 - loss0), metrics
        return loss_fn

    run = _Run(algo, cfg, loss_builder, init_model=init_model)
    tok = run.tokenizer
    reward_fn, reward_names = reward_functions(cfg, tok)
    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else None
    if weights is not None and len(weights) != len(reward_names):
        raise ValueError(f"reward_weights={cfg.reward_weights!r} must have {len(reward_names)} values "
                         f"({', '.join(reward_names)})")
    w_arr = np.ones(len(reward_names)) if weights is None else np.asarray(weights)
    multi = jax.process_count() > 1
    gen_sl = run.rows(gen_rows)  # this process's rows of a generation: whole groups of G completions
    if gen_sl.start % G or gen_sl.stop % G:
        raise ValueError(f"batch_size x steps_per_generation = {gen_rows} completions split over {jax.process_count()} "
                         f"processes give {gen_sl.stop - gen_sl.start} per process, not a multiple of "
                         f"num_generations={G}")
    p_sl = slice(gen_sl.start // G, gen_sl.stop // G)  # ... and of its prompts
    sampler = JaxSampler(run.policy.sampler_graphdef, SamplingConfig(
        max_new_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
        min_p=cfg.min_p, stop_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id, num_generations=G,
        prompt_multiple=cfg.max_prompt_length, decode_slots=getattr(cfg, "decode_slots", 0) or None), mesh=run.mesh)
    ref_params = run.frozen_params if lcfg.beta > 0 else None
    agent = None
    if uses_environment(cfg):  # --environment / --tools: multi-turn rollouts (trlax.train.agentic)
        if multi:
            raise ValueError(f"environment={cfg.environment!r} / tools={cfg.tools!r}: multi-turn rollouts run in one "
                             "process for now")
        agent = AgentRollouts(cfg, run.policy.sampler_graphdef, tok, reward_fn, reward_names, G)
        if agent.env_mode:  # one reward column: the environment's (summed over turns)
            reward_names, weights, w_arr = agent.reward_names, None, np.ones(1)
    async_gen = bool(getattr(cfg, "async_generation", False))
    if async_gen and multi:
        raise ValueError("async_generation=True runs in one process for now (its generation thread would issue "
                         "collectives out of order with the training step's); use async_generation=False")
    if async_gen and lcfg.sampler_correction is None and run.is_main:
        print("warning: async_generation=True without a sampler_correction: the rollouts are one step stale and "
              "nothing reweights them (e.g. --preset tis, or --sampler_correction token_truncate)")
    off_policy = spg > 1 or n_iter > 1 or lcfg.sampler_correction is not None or async_gen
    round_len = spg * n_iter

    @jax.jit
    def forward_logps(params, p_ids, p_mask, c_ids, c_mask):
        return run.policy.completion_logps(params, p_ids, p_mask, c_ids, c_mask, temperature=cfg.temperature)[0]

    @jax.jit
    def reference_logps(frozen, p_ids, p_mask, c_ids, c_mask):  # LoRA: the base model, adapters off
        return run.policy.reference_logps(frozen, p_ids, p_mask, c_ids, c_mask, temperature=cfg.temperature)[0]

    slicers: Dict[int, Any] = {}

    def step_rows(gbuf, s):
        """Multi-host: rows ``[s·B, (s+1)·B)`` of the global generation buffer as the step's global batch (the
        rows move between processes on the devices; no host gathers)."""
        if spg == 1:
            return gbuf
        if s not in slicers:
            lo = s * cfg.batch_size
            slicers[s] = jax.jit(lambda t: {k: v[lo:lo + cfg.batch_size] for k, v in t.items()},
                                 out_shardings=run.batch_sharding)
        return slicers[s](gbuf)

    if adaptive:  # controller state: (coefficient, previous step's entropy; None = +inf before the first step)
        ent_coef = float(run.meta.get("entropy_coef", lcfg.entropy_coef))
        last_ent = run.meta.get("last_entropy")

    data = D.EpochSampler(len(rows), n_prompts, cfg.seed, **run.meta.get("data", {}))
    key = jax.random.PRNGKey(cfg.seed) if "key" not in run.meta else jnp.asarray(key_from_meta(run.meta["key"]))

    def produce(params, version: int, gen_key, loc) -> Dict[str, Any]:
        """One generation round with ``params`` (``version`` optimiser steps old): sample, score, group
        advantages, reference log-probs. Returns the host buffer and the round's metrics."""
        p_ids, p_mask = D.encode_left_padded(tok, _texts(tok, [rows[i] for i in loc], "prompt"), cfg.max_prompt_length)
        empty = np.flatnonzero(p_mask.sum(1) == 0)
        if empty.size:
            raise ValueError(f"dataset={cfg.dataset!r}: prompt(s) {loc[empty[:5]].tolist()} tokenise to nothing")
        sp = run.policy.sampler_params(params)
        if agent is not None:  # multi-turn, tool-using rollouts (trlax.train.agentic): interleaved observations
            roll, R_loc, agent_metrics = agent.rollout(sp, [rows[i] for i in loc], gen_key)
        elif multi:  # one global sampling program over every process's prompts (tokens as with one process)
            g = _replicated(run, np.concatenate([p_ids, p_mask], 1), n_prompts)  # every process's prompts
            roll = sampler.generate_global(sp, g[:, :p_ids.shape[1]], g[:, p_ids.shape[1]:] > 0, gen_key)
        else:
            roll = sampler.generate(sp, (p_ids, p_mask), gen_key)
        c_ids, c_mask = run.local(roll.completion_ids), run.local(roll.completion_mask)
        truncated = run.local(roll.truncated)
        if agent is None:
            comp_ids = [c_ids[b][c_mask[b]].tolist() for b in range(c_ids.shape[0])]
            texts = tok.batch_decode(comp_ids, skip_special_tokens=True)  # rewards where the text is
            group_rows = [rows[i] for i in np.repeat(loc, G)]
            R_loc = reward_fn(texts, comp_ids, [str(r["prompt"]) for r in group_rows], group_rows, truncated)
        # [R | length | truncated] of every completion on every process: group / batch statistics are global
        allc = run.gather(np.concatenate([R_loc, c_mask.sum(1)[:, None], truncated[:, None]], 1), gen_rows)
        R, lengths, trunc_all = allc[:, :-2], allc[:, -2], allc[:, -1] > 0.5
        adv = np.asarray(multi_reward_advantages(jnp.asarray(R), weights, G,
                                                 aggregation=cfg.multi_objective_aggregation,
                                                 scale_rewards=cfg.scale_rewards))[gen_sl]
        total = np.nansum(R * w_arr, axis=1)
        # the loss mask: truncated rows leave it *before* the step so the global token count that
        # normalises the loss excludes them too (TRL #6439; see trlax.train.step.batch_totals)
        policy_mask = c_mask if agent is None else np.asarray(roll.loss_mask)  # multi-turn: gaps at observations
        loss_mask = policy_mask & ~truncated[:, None] if lcfg.mask_truncated_completions else policy_mask
        buf = {"prompt_ids": run.local(roll.prompt_ids), "prompt_mask": run.local(roll.prompt_mask),
               "completion_ids": c_ids, "mask": loss_mask, "advantages": adv, "truncated": truncated}
        if agent is not None:
            buf["attention_mask"] = c_mask
        fwd_in = (roll.prompt_ids, roll.prompt_mask, roll.completion_ids, roll.completion_mask)  # global arrays
        if lcfg.sampler_correction is not None or async_gen:
            buf["sampler_logps"] = run.local(roll.logps)
        if off_policy and not async_gen:  # async: the proximal policy is the one being trained (see below)
            buf["old_logps"] = run.local(forward_logps(params, *fwd_in))
        if ref_params is not None:
            buf["ref_logps"] = run.local(reference_logps(ref_params, *fwd_in))
        scored = total[~np.all(np.isnan(R), axis=1)]  # unscorable rows (no function scored them) left out, as TRL
        gen_metrics = {"reward": float(np.mean(scored)) if scored.size else 0.0,  # 0 when no row is scorable
                       "reward_std": float(np.std(scored)) if scored.size else 0.0,
                       # groups whose G rewards are all equal: zero advantage, no learning signal (TRL's metric)
                       "frac_reward_zero_std": float(np.mean(np.ptp(total.reshape(-1, G), axis=1) == 0)),
                       "completion_length": float(np.mean(lengths)),
                       "truncated_frac": float(np.mean(trunc_all))}
        if lcfg.beta == 0 and cfg.log_kl:  # monitoring only: k3 KL(π_θ ‖ π_ref) of the sampled tokens
            cur = buf["old_logps"] if "old_logps" in buf else run.local(forward_logps(params, *fwd_in))
            ref = run.local(reference_logps(run.frozen_params, *fwd_in))
            d = np.where(policy_mask, np.clip(ref - cur, -20, 20), 0.0)  # the policy's tokens only
            kl_tok = np.exp(d) - d - 1.0
            kl_sum, kl_n = D.all_sum(float(kl_tok[policy_mask].sum()), float(policy_mask.sum()))
            gen_metrics["kl"] = float(kl_sum / kl_n) if kl_n else 0.0
        from trlax.rollouts.rewards import reward_metrics

        # per function: rewards/<name>/mean, /std (TRL); NaN rewards left out of the weighted sum (TRL), counted
        gen_metrics.update(reward_metrics(R, reward_names))
        gen_metrics["policy_version"] = version
        if agent is not None:
            gen_metrics.update(agent_metrics)
        if not multi and agent is None:
            gen_metrics["slot_utilization"] = sampler.last_stats["slot_utilization"]
        return {"buf": buf, "metrics": gen_metrics, "lengths": lengths, "completion_mask": c_mask, "version": version}

    acc_col = accuracy_column(reward_names)

    def evaluate(step):  # held-out reward / accuracy / pass@G (sample_eval), sampled as in training
        sample_eval(run, sampler, reward_fn, reward_names, w_arr, eval_rows, step, k=G, n_prompts=n_prompts)

    if eval_rows is not None:
        eval_rows = sample_eval_rows(eval_rows, run, "GRPO", single_turn=agent is None, multi_process=True)
        if run.start_step == 0:
            evaluate(0)

    def draw():
        """The next round's sampling key and this process's prompts (drawn in round order on the main thread)."""
        nonlocal key
        key, gen_key = jax.random.split(key)
        return gen_key, data.next()[p_sl]  # this process's prompts of the global draw (all with one process)

    # --async_generation: round k+1 is sampled (on a worker thread) with the parameters that round k starts
    # from, while round k trains: one round stale, corrected by sampler_logps (TIS / MIS / OPSM)
    pool = pending = None
    if async_gen:
        import concurrent.futures

        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trlax-generation")
        if "inflight" in run.meta:  # the round that was in flight when the checkpoint was written
            pending = concurrent.futures.Future()
            pending.set_result(_unpack_round(run.meta["inflight"]))
    step = run.start_step
    while step < cfg.max_steps:
        if async_gen:
            if pending is None:
                pending = pool.submit(produce, _copy(run.state.params), step, *draw())
            cur = pending.result()
            rounds_left = -(-(cfg.max_steps - step) // round_len)
            pending = pool.submit(produce, _copy(run.state.params), step, *draw()) if rounds_left > 1 else None
        else:
            cur = produce(run.state.params, step, *draw())
        buf, gen_metrics, lengths = dict(cur["buf"]), cur["metrics"], cur["lengths"]
        if async_gen:  # decoupled PPO (AReaL): the ratio's old policy is the parameters this round starts from
            buf["old_logps"] = np.asarray(forward_logps(run.state.params, buf["prompt_ids"], buf["prompt_mask"],
                                                        buf["completion_ids"], cur["completion_mask"]))
        gbuf = run.place(buf, local=True, n=gen_rows) if multi else None
        prev = step
        for it in range(n_iter):
            for s in range(spg):
                if step >= cfg.max_steps:
                    break
                sl = slice(s * cfg.batch_size, (s + 1) * cfg.batch_size)
                batch = step_rows(gbuf, s) if multi else {k: v[sl] for k, v in buf.items()}
                if adaptive:
                    applied = ent_coef if last_ent is not None and last_ent <= cfg.entropy_target else 0.0
                    col = np.full(cfg.batch_size, applied)
                    batch = dict(batch, **run.place({"entropy_coef": col})) if multi else dict(batch, entropy_coef=col)
                metrics = run.train_step(batch)
                if adaptive:
                    metrics["entropy_coef"], metrics["entropy_coef_applied"] = ent_coef, applied
                if adaptive and not run.last_skipped:  # a skipped (non-finite) step leaves the controller too
                    last_ent = metrics["entropy"]
                    ent_coef = float(np.asarray(adaptive_entropy_coef(
                        ent_coef, last_ent, target=cfg.entropy_target, delta=cfg.entropy_coef_delta,
                        coef_min=cfg.entropy_coef_min, coef_max=cfg.entropy_coef_max)))
                metrics.update(gen_metrics)
                metrics["policy_lag"] = step - cur["version"]  # optimiser steps between sampling and this update
                step += 1
                run.logger.log(step, metrics, tokens=int(lengths[sl].sum()))
        if eval_rows is not None and run.due_eval(step, prev):
            evaluate(step)

        def meta():
            m = {"data": data.state(), "key": key_to_meta(key)}
            if adaptive:
                m.update(entropy_coef=ent_coef, last_entropy=last_ent)
            if pending is not None:  # saved with the checkpoint, so that --resume is exact
                m["inflight"] = _pack_round(pending.result())
            return m

        run.maybe_checkpoint(step, meta, prev_step=prev)
    if pool is not None:
        pool.shutdown()
    rewards = [r["reward"] for r in run.logger.history]
    first, last = first_last(rewards)
    summary = {"algorithm": algo, "loss_type": lcfg.loss_type, "steps": cfg.max_steps,
               "reward_first_10pct": first, "reward_last_10pct": last}
    line = f"mean reward: first 10% of steps {first:.3f} -> last 10% of steps {last:.3f}"
    if eval_rows is not None:
        line += sample_eval_summary(run, summary, eval_rows, G, acc_col is not None)
    run.summary_line = line
    return run.finish(summary)


def run(algo: str, cfg, rows=None) -> Dict[str, Any]:
    """Run trainer ``algo`` (any :func:`trlax.train.registry.names`) with its validated run config
    (``rows``: the dataset's records if already loaded and checked by :func:`trlax.train.data.load_records`)."""
    from trlax.train import registry

    return registry.get(algo).run(cfg, rows)


# run-level presets (paper settings; the objective configs' own presets are also valid --preset names)
# Run-level settings of the paper-index entries (TRL paper index, ../shared/research/trl-inventory.md sec. 1);
# a name that is also a PolicyLossConfig preset gets that preset's loss fields too (build_config).
GRPO_PRESETS = {
    # Skywork-OR1 (arXiv 2505.22312): entropy bonus under the adaptive controller (on top of
    # PolicyLossConfig.skywork_or1, which sets only the static entropy_coef=0.01 and beta=0)
    "skywork_or1": dict(use_adaptive_entropy=True, entropy_coef=0.01, entropy_target=5.0, entropy_coef_delta=0.005,
                        beta=0.0),
    # DAPO (arXiv 2503.14476, sec. 3.4) and Beyond the 80/20 Rule (arXiv 2506.01939): soft overlong punishment
    "dapo": dict(reward_funcs="builtin,soft_overlong"),
    "high_entropy": dict(reward_funcs="builtin,soft_overlong"),
    # Tricks or Traps? Lite PPO (arXiv 2508.08221): batch-level reward scale and its sampling settings
    "lite_ppo": dict(scale_rewards="batch", top_p=0.99, top_k=100, temperature=0.99),
    # ScaleRL (arXiv 2510.13786): CISPO with batch-level reward scale
    "cispo": dict(scale_rewards="batch"),
    # GDPO (arXiv 2601.05242): normalise each reward within its group, then sum
    "gdpo": dict(multi_objective_aggregation="normalize_then_sum"),
    # Demystifying Long CoT (arXiv 2502.03373): cosine length scaling + n-gram repetition penalty
    "long_cot": dict(reward_funcs="builtin,cosine,repetition"),
    # It Takes Two: Your GRPO Is Secretly DPO (arXiv 2510.00977): two completions per prompt
    "two_grpo": dict(num_generations=2, loss_type="grpo"),
}
DPO_PRESETS = {
    # TR-DPO (arXiv 2404.09656; TRL paper index #32): soft reference updates alpha=0.6 every 512 steps, beta=0.05
    "tr_dpo": dict(sync_ref_model=True, ref_model_mixup_alpha=0.6, ref_model_sync_steps=512, beta=0.05),
}
SFT_PRESETS = {
    # Fewer Truncations Improve Language Modeling (arXiv 2404.10830): best-fit packing, long sequences split
    "bfd_split": dict(packing="bfd_split"),
    # T5 (arXiv 1910.10683, sec. 3.1.2): concatenate and cut into rows (each piece its own segment here)
    "t5": dict(packing="wrapped"),
}


def _specs():
    from trlax.objectives.policy import PolicyLossConfig
    from trlax.objectives.preference import PreferenceLossConfig
    from trlax.train import config as C
    from trlax.train.registry import TrainerSpec

    return [
        TrainerSpec("grpo", C._grpo_cls, run_grpo, ("prompt",), D.max_digit_examples,
                    loss_config_cls=PolicyLossConfig, metric="reward", presets=GRPO_PRESETS,
                    description="GRPO family: every PolicyLossConfig loss (DAPO, Dr. GRPO, GSPO, CISPO, SAPO ...)"),
        TrainerSpec("dpo", C._dpo_cls, run_dpo, ("prompt", "chosen", "rejected"), D.preference_examples,
                    loss_config_cls=PreferenceLossConfig, metric="rewards/accuracies", presets=DPO_PRESETS,
                    description="DPO family: every PreferenceLossConfig loss (IPO, SLiC, RPO, APO, ...)"),
        TrainerSpec("sft", C._sft_cls, run_sft, ("prompt", "completion"), D.sft_examples, metric="nll",
                    presets=SFT_PRESETS, description="supervised fine-tuning (NLL / DFT, BEMA, packing)"),
    ]


SPECS = _specs()


__all__ = ["first_last", "make_optimizer", "pack_examples", "run", "run_dpo", "run_grpo", "run_sft", "save_config"]
