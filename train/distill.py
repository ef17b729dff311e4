"""Distillation trainers behind ``trlax train gkd | opd | iw_opd | sdft | sdpo | ssd``.

Every loop uses the layout of :mod:`trlax.train.loops` (left-padded prompt block ``[B, P]`` + right-padded
completion block ``[B, C]``); teacher quantities (logits ``[B, C, V]`` or log-probs ``[B, C]``) are computed
outside the gradient with the teacher's frozen parameters (one jitted forward) and travel in the batch.

- ``gkd`` — Generalized Knowledge Distillation (Agarwal et al., arXiv 2306.13649, eq. 1-2, alg. 1): with
  probability ``lmbda`` the batch's completions are sampled from the student (on-policy), else they are the
  teacher's samples (``seq_kd``) or the dataset's; loss :func:`trlax.objectives.gkd_loss` (generalised JSD
  with ``beta``, token level, global token count).
- ``gold`` — GOLD cross-tokenizer distillation (TRL ``GOLDTrainer`` with ``use_uld_loss``): the teacher
  has its own tokenizer; completions are re-tokenised for it and the loss is ULD (arXiv 2402.12030,
  :func:`trlax.objectives.uld_loss`). Its ``builtin`` teacher uses :func:`cross_tokenizer`.
- ``opd`` — on-policy distillation (Thinking Machines, "On-Policy Distillation", 2025; GKD sec. 3 with
  β = 1): student samples, per-token reverse-KL advantage ``−(ℓ_S − ℓ_T)`` as a policy gradient
  (:func:`trlax.objectives.on_policy_distillation_loss`). The full-vocabulary reverse-KL variant is
  ``trlax train gkd --lmbda 1 --beta 1``.
- ``iw_opd`` — IW-OPD (arXiv 2606.22600, eq. 7-8): the same samples, advantages re-weighted by position
  (:func:`trlax.objectives.iw_opd_loss`).
- ``sdft`` / ``sdpo`` — self-distillation (SDFT, Shenfeld et al. arXiv 2601.19897; SDPO, Hübotter et al.
  arXiv 2601.20802, eq. 4): the teacher is the policy's EMA (``teacher_update_rate``) shown the prompt
  *with a demonstration* (SDFT: the dataset's completion; SDPO: a successful sample of the same group,
  rows of groups without one are masked out); the student sees the bare prompt; loss
  :func:`trlax.objectives.self_distillation_loss` on the student's top-k logits.
- ``ssd`` — Embarrassingly Simple Self-Distillation (arXiv 2604.01193): sample from the policy itself
  (temperature 0.6, top-k 20, top-p 0.95) and train plain cross-entropy on those samples.

Teachers: ``teacher_model`` is a local Hugging Face checkpoint with the student's tokenizer, or ``builtin``:
the run first trains one — :func:`trlax.train.loops.run_sft` of the student's initial model on the built-in
addition task for ``teacher_steps`` steps into ``<output_dir>/teacher`` — so the untrained tiny student has
something real to learn. Self-distillation on the built-in task needs a model that can *read* a
demonstration: ``warm_start=auto`` (tiny model + built-in data) first fine-tunes the tiny model to copy the
answer shown in the teacher prompt (``<output_dir>/warm_start``) and to guess a uniformly random digit
without one (it is never taught to add); the trainer then distils that in-context behaviour into the
bare-prompt policy.

Held-out evaluation (``--eval_dataset`` / ``--eval_split``, ``--eval_steps``) of the trainers that sample from the
student (all but the teacher-only batches of gkd / gold) is GRPO's (:func:`trlax.train.loops.sample_eval`):
accuracy (and pass@k) of the student's samples against the rows' ``answer`` / ``solution`` / ``completion``, with
the training step's sampling program (k = ``num_generations`` for sdft / sdpo, else 1), logged with split "eval".
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trlax.objectives._checks import check_choice, check_range
from trlax.train import data as D
from trlax.train import loops as L
from trlax.train.config import make_run_config

# ------------------------------------------------------------------------------------------ helpers


def completion_logits(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> jnp.ndarray:
    """``[B, C, V]`` float32 logits predicting each completion token (the state at ``t`` predicts ``t + 1``)."""
    P, C = prompt_ids.shape[1], completion_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, jnp.where(completion_mask, completion_ids, 0)], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(bool)
    return model(ids, attention_mask=mask)[:, P - 1:P + C - 1]


def _token_logps(logits, ids, mask):
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.where(mask, ids, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(mask, lp, 0.0)


def _masked_mean(x, mask) -> float:
    mask = np.asarray(mask, bool)
    return float(np.asarray(x)[mask].mean()) if mask.any() else 0.0


def _sub_run(algo: str, values: Dict[str, Any], rows) -> str:
    """Run a helper SFT (builtin teacher / warm start) into ``values["output_dir"]`` unless its export
    already exists (a resumed run reuses it); returns the exported checkpoint dir."""
    from trlax.train.config import build_config

    final = os.path.join(values["output_dir"], "final")
    if not os.path.isfile(os.path.join(final, "config.json")):
        cfg = build_config("sft", dict(values, progress=False, export=True, resume=True))
        L.run_sft(cfg, rows, algo="sft")
    return final


def builtin_teacher(cfg, model: Optional[str] = None) -> str:
    """Train the ``teacher_model="builtin"`` teacher: SFT of the run's initial model (``cfg.model``, seed
    ``cfg.seed``; or ``model``) on the built-in addition task for ``cfg.teacher_steps`` steps; returns its
    checkpoint dir (``<output_dir>/teacher/final``)."""
    return _sub_run("sft", dict(
        model=model or cfg.model, seed=cfg.seed, output_dir=os.path.join(cfg.output_dir, "teacher"),
        max_steps=cfg.teacher_steps, batch_size=32, learning_rate=3e-3, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype), D.sft_examples(1024, cfg.seed))


@dataclasses.dataclass
class Teacher:
    """A frozen teacher: graph, parameters (placed like the policy's), its tokenizer and jitted forwards."""

    graphdef: Any
    params: Any
    tokenizer: Any = None

    def __post_init__(self):
        g = self.graphdef
        self._logits = jax.jit(lambda p, *a: completion_logits(nnx.merge(g, p), *a))
        self._logps = jax.jit(lambda p, a, b, c, d, t: _token_logps(
            completion_logits(nnx.merge(g, p), a, b, c, d) / t, c, d))

    def logits(self, p_ids, p_mask, c_ids, c_mask) -> np.ndarray:
        return L._host(self._logits(self.params, p_ids, p_mask, c_ids, c_mask))

    def logps(self, p_ids, p_mask, c_ids, c_mask, temperature: float = 1.0) -> np.ndarray:
        return L._host(self._logps(self.params, p_ids, p_mask, c_ids, c_mask, temperature))


def load_teacher(cfg, run, path: Optional[str] = None, same_tokenizer: bool = True) -> Teacher:
    """The run's teacher (``path``, else ``cfg.teacher_model``: ``builtin`` or a checkpoint dir), checked to
    share the student's vocabulary unless ``same_tokenizer=False``, placed on the run's mesh."""
    from trlax.models import load_pretrained
    from trlax.models.sharding import param_shardings, sharding_rules
    from trlax.train.modeling import _DTYPES

    path = path or (builtin_teacher(cfg) if cfg.teacher_model == "builtin" else cfg.teacher_model)
    model, tok = load_pretrained(path, dtype=_DTYPES[cfg.param_dtype], compute_dtype=_DTYPES[cfg.compute_dtype],
                                 return_tokenizer=True)
    if not same_tokenizer:
        if tok is None:
            raise ValueError(f"teacher_model={cfg.teacher_model!r} has no tokenizer files; cross-tokenizer "
                             "distillation re-tokenises every completion with the teacher's tokenizer")
    elif model.config.vocab_size != run.policy.config.vocab_size:
        raise ValueError(f"teacher_model={cfg.teacher_model!r} has vocab_size={model.config.vocab_size}, the student "
                         f"{run.policy.config.vocab_size}; distillation needs the same tokenizer")
    if same_tokenizer and tok is not None and tok.get_vocab() != run.tokenizer.get_vocab():
        raise ValueError(f"teacher_model={cfg.teacher_model!r} has a different tokenizer than the student")
    graphdef, params = nnx.split(model)
    params = jax.device_put(params, param_shardings(params, run.mesh, sharding_rules("fsdp_tp")))
    return Teacher(graphdef, params, tok)


def _sampler(run, cfg, graphdef=None, **kw):
    from trlax.rollouts import JaxSampler, SamplingConfig

    tok = run.tokenizer
    sc = SamplingConfig(max_new_tokens=cfg.max_completion_length, stop_token_ids=(tok.eos_token_id,),
                        pad_token_id=tok.pad_token_id, prompt_multiple=cfg.max_prompt_length, **kw)
    return JaxSampler(run.policy.sampler_graphdef if graphdef is None else graphdef, sc, mesh=run.mesh)


def _prompts(run, cfg, rows, col="prompt"):
    P_ids, P_mask = D.encode_left_padded(run.tokenizer, L._texts(run.tokenizer, rows, col), cfg.max_prompt_length)
    empty = np.flatnonzero(P_mask.sum(1) == 0)
    if empty.size:
        raise ValueError(f"dataset={cfg.dataset!r}: prompt(s) {empty[:5].tolist()} tokenise to nothing")
    return P_ids, P_mask


def _step_key(cfg, step: int):
    """Per-step sampling key (a function of seed and step, so a resumed run draws the same samples)."""
    return jax.random.fold_in(jax.random.PRNGKey(cfg.seed), step)


def _roll_batch(roll) -> Dict[str, np.ndarray]:
    return {"prompt_ids": L._host(roll.prompt_ids), "prompt_mask": L._host(roll.prompt_mask),
            "completion_ids": L._host(roll.completion_ids), "mask": L._host(roll.completion_mask)}


def _finish(run, cfg, algo: str, metric: str, extra: Optional[Dict[str, Any]] = None, ev=None):
    first, last = L.first_last([r.get(metric, np.nan) for r in run.logger.history])
    out = dict({"algorithm": algo, "steps": cfg.max_steps, "metric": metric,
                f"{metric}_first_10pct": first, f"{metric}_last_10pct": last}, **(extra or {}))
    line = f"{metric}: first 10% of steps {first:.4f} -> last 10% {last:.4f}"
    print(line + (ev.summary(out) if ev is not None else ""))
    return run.finish(out)


def _evaluation(run, cfg, eval_rows, algo: str, sampler, k: int = 1, n_prompts: Optional[int] = None):
    """Held-out evaluation of a distillation trainer that samples from the student (None without eval rows):
    GRPO's code path (:func:`trlax.train.loops.sample_eval` through :class:`trlax.train.rl._Evaluation`), ``k``
    samples of each held-out prompt from the training step's ``sampler`` (``n_prompts`` prompts a batch, default
    ``batch_size``: its compiled program), scored by ``accuracy``: the completion is the row's ``answer`` /
    ``solution`` / ``completion`` followed by EOS (the built-in verifier's accuracy,
    :func:`trlax.train.data.addition_rewards`); logs mean reward (= accuracy), accuracy and pass@k."""
    if eval_rows is None:
        return None
    import types

    from trlax.train.rl import _evaluation as rl_evaluation

    def answer(r):
        if "answer" in r or "solution" in r:
            return str(r.get("answer", r.get("solution"))).strip()
        c = r["completion"]
        return (c if isinstance(c, str) else " ".join(str(m.get("content", "")) for m in c)).strip()

    if not any(k_ in eval_rows[0] for k_ in ("answer", "solution", "completion")):
        raise ValueError(f"held-out evaluation (eval_dataset={cfg.eval_dataset!r} / eval_split={cfg.eval_split}) of "
                         f"{algo} scores accuracy against an 'answer', 'solution' or 'completion' column; the rows "
                         f"have {sorted(eval_rows[0])}")

    def reward_fn(texts, comp, prompts, rows, truncated):
        return D.addition_rewards([t.strip() for t in texts], [answer(r) for r in rows], truncated)[:, :1]

    ro = types.SimpleNamespace(sampler=sampler, reward_fn=reward_fn, reward_names=("accuracy",),
                               weights=np.ones(1), agent=None)
    return rl_evaluation(run, cfg, ro, eval_rows, algo, k, n_prompts or cfg.batch_size)


def _maybe_eval(run, ev, step: int) -> None:
    """Evaluate before the first step of a fresh run (``step`` 0) and when due (``eval_steps``, last step)."""
    if ev is not None and (run.due_eval(step, step - 1) if step else run.start_step == 0):
        ev(step)


# --------------------------------------------------------------------------------------------- GKD


def run_gkd(cfg, rows=None, algo: str = "gkd") -> Dict[str, Any]:
    """GKD (arXiv 2306.13649, alg. 1): per step, with probability ``lmbda`` the completions are the
    student's own samples (temperature ``temperature``), else the teacher's (``seq_kd``) or the dataset's;
    loss = generalised JSD(β) between student and teacher next-token distributions at ``kd_temperature``,
    summed over completion tokens / global token count (TRL ``GKDTrainer``)."""
    from trlax.objectives.distillation import gkd_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            s = completion_logits(run.policy.model(params), b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                  b["mask"])
            return gkd_loss(s, b["teacher_logits"], b["mask"], beta=cfg.beta, temperature=cfg.kd_temperature,
                            num_items=totals["num_items"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    teacher = load_teacher(cfg, run)
    P_ids, P_mask = _prompts(run, cfg, rows)
    C_ids, C_mask = D.encode_right_padded(run.tokenizer, L._texts(run.tokenizer, rows, "completion"),
                                          cfg.max_completion_length)
    student_s = _sampler(run, cfg, temperature=cfg.temperature)
    teacher_s = _sampler(run, cfg, teacher.graphdef, temperature=cfg.temperature) if cfg.seq_kd else None
    ev = _evaluation(run, cfg, eval_rows, algo, student_s)  # held-out accuracy of the student's samples
    _maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        on_policy = np.random.default_rng([cfg.seed, step]).random() < cfg.lmbda
        if on_policy:
            b = _roll_batch(student_s.generate(run.policy.sampler_params(run.state.params), (P_ids[idx], P_mask[idx]),
                                               _step_key(cfg, step)))
        elif teacher_s is not None:
            b = _roll_batch(teacher_s.generate(teacher.params, (P_ids[idx], P_mask[idx]), _step_key(cfg, step)))
        else:
            b = {"prompt_ids": P_ids[idx], "prompt_mask": P_mask[idx], "completion_ids": C_ids[idx],
                 "mask": C_mask[idx]}
        b["teacher_logits"] = teacher.logits(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
        m = run.train_step(b)
        m["on_policy"] = float(on_policy)
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        _maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return _finish(run, cfg, algo, "jsd", {"beta": cfg.beta, "lmbda": cfg.lmbda}, ev)


# ------------------------------------------------------------------------------ GOLD (cross-tokenizer)


def cross_tokenizer(directory: str):
    """The teacher tokenizer of ``trlax train gold --teacher_model builtin``: character-level like the
    student's (:func:`trlax.train.data.build_tokenizer`) but a different tokenizer — its own token ids
    (characters in reverse order, special tokens last) and a larger vocabulary (lower-case letters added).
    Saved to ``directory`` as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = D._CHARS[::-1] + list("abcdefghijklmnopqrstuvwxyz")
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(chars + D._SPECIALS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>")
    fast.chat_template = D.CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def builtin_cross_teacher(cfg) -> str:
    """``trlax train gold --teacher_model builtin``: a tiny model with :func:`cross_tokenizer` (random,
    seed ``cfg.seed + 1``, saved to ``<output_dir>/teacher_init``) trained like :func:`builtin_teacher`;
    returns its checkpoint dir."""
    from trlax.models import Decoder, DecoderConfig, save_pretrained
    from trlax.train.modeling import tiny_hf_config

    init = os.path.join(cfg.output_dir, "teacher_init")
    if not os.path.isfile(os.path.join(init, "config.json")):
        tok = cross_tokenizer(init)
        save_pretrained(Decoder(DecoderConfig.from_hf(tiny_hf_config(tok)), rngs=nnx.Rngs(cfg.seed + 1)), init,
                        tokenizer=tok)
    return builtin_teacher(cfg, model=init)


def _drop_eos(ids, mask, eos_id):
    return mask & (ids != eos_id)


def run_gold(cfg, rows=None, algo: str = "gold") -> Dict[str, Any]:
    """GOLD (TRL ``GOLDTrainer`` with ``use_uld_loss``): distillation from a teacher whose tokenizer differs
    from the student's. Per step, with probability ``lmbda`` the completions are the student's own samples,
    else the dataset's; each prompt and completion is decoded to text and re-tokenised with the teacher's
    tokenizer, the teacher gives its logits on its own tokens, and the loss is
    :func:`trlax.objectives.uld_loss` (Universal Logit Distillation, arXiv 2402.12030: sorted-probability
    L1 between positionally aligned tokens) plus ``uld_crossentropy_weight`` × the student's NLL. EOS
    positions are left out of the alignment when ``uld_skip_student_eos`` / ``uld_skip_teacher_eos``
    (TRL's defaults). Logs ``uld`` (mean distance per aligned token)."""
    from trlax.objectives.distillation import uld_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)

    def loss_builder(run):
        eos = run.tokenizer.eos_token_id

        def loss_fn(params, b, totals):
            s = completion_logits(run.policy.model(params), b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                  b["mask"])
            s_mask = _drop_eos(b["completion_ids"], b["mask"], eos) if cfg.uld_skip_student_eos else b["mask"]
            return uld_loss(s, b["teacher_logits"], s_mask, b["teacher_mask"],
                            student_temperature=cfg.uld_student_temperature,
                            teacher_temperature=cfg.uld_teacher_temperature,
                            distillation_weight=cfg.uld_distillation_weight,
                            crossentropy_weight=cfg.uld_crossentropy_weight,
                            logps=_token_logps(s, b["completion_ids"], b["mask"]),
                            num_sequences=totals["num_sequences"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    path = builtin_cross_teacher(cfg) if cfg.teacher_model == "builtin" else None
    teacher = load_teacher(cfg, run, path, same_tokenizer=False)
    tok, t_tok = run.tokenizer, teacher.tokenizer
    P_ids, P_mask = _prompts(run, cfg, rows)
    C_ids, C_mask = D.encode_right_padded(tok, L._texts(tok, rows, "completion"), cfg.max_completion_length)
    tP_ids, tP_mask = D.encode_left_padded(t_tok, L._texts(t_tok, rows, "prompt"), cfg.max_prompt_length)
    sampler = _sampler(run, cfg, temperature=cfg.temperature)
    ev = _evaluation(run, cfg, eval_rows, algo, sampler)  # held-out accuracy of the student's samples
    _maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        on_policy = np.random.default_rng([cfg.seed, step]).random() < cfg.lmbda
        if on_policy:
            b = _roll_batch(sampler.generate(run.policy.sampler_params(run.state.params), (P_ids[idx], P_mask[idx]),
                                             _step_key(cfg, step)))
        else:
            b = {"prompt_ids": P_ids[idx], "prompt_mask": P_mask[idx], "completion_ids": C_ids[idx],
                 "mask": C_mask[idx]}
        texts = tok.batch_decode([r[m].tolist() for r, m in zip(b["completion_ids"], b["mask"])],
                                 skip_special_tokens=True)
        ended = [bool(m.any()) and r[m][-1] == tok.eos_token_id for r, m in zip(b["completion_ids"], b["mask"])]
        tc_ids, tc_mask = D.encode_right_padded(t_tok, texts, cfg.max_completion_length, add_eos=False)
        for i in np.flatnonzero(ended):  # the teacher's EOS where the student's completion ended
            n = int(tc_mask[i].sum())
            if n < tc_mask.shape[1]:
                tc_ids[i, n], tc_mask[i, n] = t_tok.eos_token_id, True
        b["teacher_logits"] = teacher.logits(tP_ids[idx], tP_mask[idx], tc_ids, tc_mask)
        b["teacher_mask"] = _drop_eos(tc_ids, tc_mask, t_tok.eos_token_id) if cfg.uld_skip_teacher_eos else tc_mask
        b["teacher_prompt_ids"], b["teacher_prompt_mask"] = tP_ids[idx], tP_mask[idx]  # (for the record / tests)
        b["teacher_completion_ids"], b["teacher_completion_mask"] = tc_ids, tc_mask
        m = run.train_step(b)
        m["on_policy"] = float(on_policy)
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        _maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return _finish(run, cfg, algo, "uld", {"lmbda": cfg.lmbda}, ev)


# ------------------------------------------------------------------------------ on-policy distillation


def run_opd(cfg, rows=None, algo: str = "opd") -> Dict[str, Any]:
    """On-policy distillation (``opd``: :func:`trlax.objectives.on_policy_distillation_loss`) or IW-OPD
    (``iw_opd``: :func:`trlax.objectives.iw_opd_loss`): each step samples one completion per prompt from the
    current student (λ = 1), scores its tokens with the teacher (log-probs at ``temperature``) and takes a
    policy-gradient step on the per-token reverse-KL advantage. Logs ``reverse_kl``: the sampled tokens'
    mean ``ℓ_sampler − ℓ_T`` (a Monte-Carlo estimate of the per-token KL(student ‖ teacher)).

    ``iw_opd`` with ``distillation_objective="jsd"`` (TRL ``IWOPDTrainer``) distils the teacher's logits on
    the same samples instead: generalised JSD(``beta``) over the full vocabulary (``loss_top_k=0``,
    :func:`trlax.objectives.gkd_loss`) or on the sparse top-1 support (``loss_top_k=1``,
    :func:`trlax.objectives.sparse_top1_distillation_loss`: teacher top-1 + the ``reverse_kl_top_1_mode``
    token, tail bucket with ``loss_add_tail``), both at ``temperature``."""
    from trlax.objectives.distillation import (gkd_loss, iw_opd_loss, on_policy_distillation_loss,
                                               sparse_top1_distillation_loss)

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    iw = algo == "iw_opd"
    jsd = iw and cfg.distillation_objective == "jsd"

    def loss_builder(run):
        def loss_fn(params, b, totals):
            if jsd:
                s = completion_logits(run.policy.model(params), b["prompt_ids"], b["prompt_mask"],
                                      b["completion_ids"], b["mask"])
                if cfg.loss_top_k == 1:
                    return sparse_top1_distillation_loss(
                        s, b["teacher_logits"], b["completion_ids"], b["mask"], beta=cfg.beta,
                        temperature=cfg.temperature, add_tail=cfg.loss_add_tail,
                        reverse_token=cfg.reverse_kl_top_1_mode, num_items=totals["num_items"])
                return gkd_loss(s, b["teacher_logits"], b["mask"], beta=cfg.beta, temperature=cfg.temperature,
                                num_items=totals["num_items"])
            lp, _ = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                b["mask"], temperature=cfg.temperature)
            if iw:
                return iw_opd_loss(lp, b["teacher_logps"], b["mask"], gamma=cfg.iw_opd_gamma,
                                   num_items=totals["num_items"])
            return on_policy_distillation_loss(lp, b["teacher_logps"], b["mask"], kl_coef=cfg.kl_coef,
                                               num_items=totals["num_items"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    teacher = load_teacher(cfg, run)
    P_ids, P_mask = _prompts(run, cfg, rows)
    sampler = _sampler(run, cfg, temperature=cfg.temperature)
    ev = _evaluation(run, cfg, eval_rows, algo, sampler)  # held-out accuracy of the student's samples
    _maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        roll = sampler.generate(run.policy.sampler_params(run.state.params), (P_ids[idx], P_mask[idx]),
                                _step_key(cfg, step))
        b = _roll_batch(roll)
        b["teacher_logps"] = teacher.logps(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"],
                                           cfg.temperature)
        if jsd:
            b["teacher_logits"] = teacher.logits(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
        rkl = _masked_mean(L._host(roll.logps) - b["teacher_logps"], b["mask"])
        m = run.train_step(b)
        m.setdefault("reverse_kl", rkl)
        m["sampled_reverse_kl"] = rkl
        m["completion_length"] = float(b["mask"].sum(1).mean())
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        _maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return _finish(run, cfg, algo, "sampled_reverse_kl", ev=ev)


# --------------------------------------------------------------------------------- self-distillation


def _warm_start(cfg) -> Optional[str]:
    """``warm_start``: fine-tune ``cfg.model`` to answer teacher prompts by copying their demonstration
    (``{prompt}{answer} {prompt}`` -> ``answer`` on the built-in task) and bare prompts with a uniformly
    random digit (it knows no addition), so that the tiny model can act as its own teacher and its
    bare-prompt samples are diverse — SDPO learns only from groups that hold both a success and a failure.
    Returns the checkpoint dir, or None."""
    mode = cfg.warm_start
    if mode == "auto":
        mode = "builtin" if cfg.model == "tiny" and cfg.dataset == "builtin" else "off"
    if mode == "off":
        return None
    rng = np.random.default_rng(cfg.seed + 7)
    rows = []
    for e in D.addition_examples(1024, cfg.seed + 7):
        rows.append({"prompt": cfg.teacher_template.format(prompt=e["prompt"], demonstration=e["answer"]),
                     "completion": e["answer"]})
        rows.append({"prompt": e["prompt"], "completion": str(rng.integers(10))})  # no demonstration: a guess
    return _sub_run("sft", dict(
        model=cfg.model, seed=cfg.seed, output_dir=os.path.join(cfg.output_dir, "warm_start"),
        max_steps=cfg.warm_start_steps, batch_size=32, learning_rate=3e-3, max_prompt_length=_teacher_width(cfg),
        max_completion_length=cfg.max_completion_length, param_dtype=cfg.param_dtype,
        compute_dtype=cfg.compute_dtype), rows)


def _teacher_width(cfg) -> int:
    return 2 * cfg.max_prompt_length + cfg.max_completion_length


def run_self_distill(cfg, rows=None, algo: str = "sdft") -> Dict[str, Any]:
    """SDFT / SDPO. Each step: the student samples ``num_generations`` completions per bare prompt; the
    teacher — the EMA of the policy (``teacher_update_rate``; 1 = the current policy), kept in
    ``TrainState.extra`` — reads ``teacher_template`` (prompt + demonstration + prompt) and gives its logits
    on the same completion tokens; loss :func:`trlax.objectives.self_distillation_loss`. SDFT's
    demonstration is the dataset's ``completion``; SDPO's is a successful completion of the same group
    (built-in verifier on ``answer``; rows whose group has none are masked out). ``distillation_topk``
    larger than the vocabulary is clamped to it (the top-k then covers every token). Logs ``accuracy`` of
    the student's bare-prompt samples (built-in verifier)."""
    from trlax.objectives.distillation import self_distillation_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    sdpo = algo == "sdpo"
    G = cfg.num_generations
    warm = _warm_start(cfg)
    if warm is not None:
        cfg = dataclasses.replace(cfg, model=warm)
    topk = [cfg.distillation_topk]

    def loss_builder(run):
        def loss_fn(params, b, totals):
            s = completion_logits(run.policy.model(params), b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                  b["mask"]) / cfg.temperature
            return self_distillation_loss(
                s, b["teacher_logits"], b["mask"], mode=cfg.distillation_mode, alpha=cfg.distillation_alpha,
                topk=topk[0], add_tail=cfg.distillation_add_tail, tokens=b["completion_ids"],
                logps=_token_logps(s, b["completion_ids"], b["mask"]), old_logps=b["old_logps"],
                is_clip=cfg.distillation_is_clip, aggregation="dapo", num_items=totals["num_items"],
                num_sequences=totals["num_sequences"])
        return loss_fn

    run = L._Run(algo, cfg, loss_builder, extra_state_fn=L._copy)
    V = run.policy.config.vocab_size
    if topk[0] > V:
        print(f"distillation_topk={topk[0]} > vocabulary size {V}: using {V}")
        topk[0] = V
    tok = run.tokenizer
    P_ids, P_mask = _prompts(run, cfg, rows)
    sampler = _sampler(run, cfg, temperature=cfg.temperature, num_generations=G)
    rate = cfg.teacher_update_rate  # (with LoRA the EMA is of the adapters; policy.model adds the frozen base)
    t_logits = jax.jit(lambda p, *a: completion_logits(run.policy.model(p), *a) / cfg.temperature)
    ema = jax.jit(lambda p, e: jax.tree_util.tree_map(lambda x, y: (1 - rate) * y + rate * x, p, e))
    # held-out accuracy of the student's bare-prompt samples: G per prompt, the training step's program
    ev = _evaluation(run, cfg, eval_rows, algo, sampler, k=G, n_prompts=cfg.batch_size // G)
    _maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size // G, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        roll = sampler.generate(run.policy.sampler_params(run.state.params), (P_ids[idx], P_mask[idx]),
                                _step_key(cfg, step))
        b = _roll_batch(roll)
        trunc = L._host(roll.truncated)
        group_rows = [rows[i] for i in np.repeat(idx, G)]
        texts = tok.batch_decode([r[m].tolist() for r, m in zip(b["completion_ids"], b["mask"])],
                                 skip_special_tokens=True)
        answers = [str(r.get("answer", r.get("completion", ""))).strip() for r in group_rows]
        acc = D.addition_rewards([t.strip() for t in texts], answers, trunc)[:, 0]
        if sdpo:  # a successful sibling (the first of the group) is the demonstration
            demos, has = [], np.zeros(len(texts), bool)
            for i in range(len(texts)):
                ok = [j for j in range(i - i % G, i - i % G + G) if acc[j] > 0]
                has[i] = bool(ok)
                demos.append(texts[ok[0]].strip() if ok else "")
            b["mask"] = b["mask"] & has[:, None]
        else:
            demos = [D.as_text(tok, r["completion"]) for r in group_rows]
        t_texts = [cfg.teacher_template.format(prompt=D.as_text(tok, r["prompt"]), demonstration=d)
                   for r, d in zip(group_rows, demos)]
        tp_ids, tp_mask = D.encode_left_padded(tok, t_texts, _teacher_width(cfg))
        b["teacher_logits"] = L._host(t_logits(run.state.extra, tp_ids, tp_mask, b["completion_ids"], b["mask"]))
        b["teacher_prompt_ids"], b["teacher_prompt_mask"] = tp_ids, tp_mask  # (for the record / tests)
        b["old_logps"] = L._host(roll.logps)
        m = run.train_step(b)
        if not run.last_skipped:  # a skipped (non-finite) step leaves the EMA teacher too
            run.state = run.state._replace(extra=ema(run.state.params, run.state.extra))
        m["accuracy"] = float(acc.mean())
        m["teacher_rows"] = float(b["mask"].any(1).mean())
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        _maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return _finish(run, cfg, algo, "accuracy", {"warm_start": warm}, ev)


# --------------------------------------------------------------------------------------------- SSD


def run_ssd(cfg, rows=None, algo: str = "ssd") -> Dict[str, Any]:
    """SSD (arXiv 2604.01193): each step samples completions from the current policy with ``temperature`` /
    ``top_k`` / ``top_p`` and trains plain cross-entropy (:func:`trlax.objectives.sft_loss`, NLL at
    temperature 1, global token count) on them — no teacher, no verifier. Logs ``nll`` (of the model's own
    fresh samples) and ``entropy`` (mean per-token entropy at those positions)."""
    from trlax.objectives.aggregation import mean_metric
    from trlax.objectives.supervised import sft_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            lp, ent = run.policy.completion_logps(params, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                                  b["mask"])
            loss, m = sft_loss(lp, b["mask"], num_items=totals["num_items"])
            m["entropy"] = mean_metric(jax.lax.stop_gradient(ent), b["mask"])
            return loss, m
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    P_ids, P_mask = _prompts(run, cfg, rows)
    sampler = _sampler(run, cfg, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    ev = _evaluation(run, cfg, eval_rows, algo, sampler)  # held-out accuracy of the policy's samples
    _maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        b = _roll_batch(sampler.generate(run.policy.sampler_params(run.state.params), (P_ids[idx], P_mask[idx]),
                                         _step_key(cfg, step)))
        m = run.train_step(b)
        m["completion_length"] = float(b["mask"].sum(1).mean())
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        _maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return _finish(run, cfg, algo, "nll", ev=ev)


# ------------------------------------------------------------------------------------------ configs

_COMMON = dict(batch_size=32, max_steps=60, learning_rate=1e-3, max_prompt_length=8, max_completion_length=4)


def _check_teacher(self) -> None:
    check_range("teacher_steps", self.teacher_steps, low=1)
    if self.teacher_model != "builtin":
        from trlax.train.modeling import check_model

        if self.teacher_model == "tiny":
            raise ValueError("teacher_model='tiny' is an untrained model; use 'builtin' or a checkpoint dir")
        try:
            check_model(self.teacher_model)
        except ValueError:
            raise ValueError(f"teacher_model={self.teacher_model!r} is neither 'builtin' nor a local Hugging Face "
                             "checkpoint directory (config.json + model.safetensors)") from None


_TEACHER = [("preset", str, ""), ("teacher_model", str, "builtin"), ("teacher_steps", int, 60),
            ("temperature", float, 1.0)]


def _validate_gkd(self) -> None:
    _check_teacher(self)
    check_range("lmbda", self.lmbda, low=0.0, high=1.0)
    check_range("beta", self.beta, low=0.0, high=1.0)
    check_range("kd_temperature", self.kd_temperature, low=0.0, low_inclusive=False)


def _gkd_cls():
    return make_run_config("gkd", _TEACHER + [
        ("lmbda", float, 0.5),  # probability of a student-generated (on-policy) batch
        ("beta", float, 0.5),  # generalised JSD interpolation: 0 forward KL, 1 reverse KL
        ("kd_temperature", float, 1.0),  # temperature of the divergence (TRL's loss uses 1)
        ("seq_kd", bool, False),  # off-policy batches: teacher-generated completions instead of the dataset's
    ], defaults=_COMMON, validate=_validate_gkd, doc="trlax train gkd: Generalized Knowledge Distillation")


def _validate_gold(self) -> None:
    _check_teacher(self)
    check_range("lmbda", self.lmbda, low=0.0, high=1.0)
    for f in ("uld_student_temperature", "uld_teacher_temperature"):
        check_range(f, getattr(self, f), low=0.0, low_inclusive=False)
    for f in ("uld_distillation_weight", "uld_crossentropy_weight"):
        check_range(f, getattr(self, f), low=0.0)


def _gold_cls():
    # field names and defaults of TRL's GOLDConfig (use_uld_loss=True, positional alignment)
    return make_run_config("gold", _TEACHER + [
        ("lmbda", float, 0.5),  # probability of a student-generated (on-policy) batch
        ("uld_student_temperature", float, 1.0),
        ("uld_teacher_temperature", float, 1.0),
        ("uld_distillation_weight", float, 1.0),
        ("uld_crossentropy_weight", float, 0.0),
        ("uld_skip_student_eos", bool, True),
        ("uld_skip_teacher_eos", bool, True),
    ], defaults=_COMMON, validate=_validate_gold,
        doc="trlax train gold: cross-tokenizer distillation (GOLD / Universal Logit Distillation)")


def _validate_opd(self) -> None:
    _check_teacher(self)
    check_range("kl_coef", self.kl_coef, low=0.0)


def _opd_cls():
    return make_run_config("opd", _TEACHER + [("kl_coef", float, 1.0)], defaults=_COMMON, validate=_validate_opd,
                           doc="trlax train opd: on-policy distillation (per-token reverse-KL advantage)")


def _validate_iw(self) -> None:
    from trlax.objectives.distillation import TOP1_REVERSE_MODES

    _check_teacher(self)
    check_range("iw_opd_gamma", self.iw_opd_gamma, low=0.0)
    check_choice("distillation_objective", self.distillation_objective, ("iw_opd", "jsd"))
    check_range("beta", self.beta, low=0.0, high=1.0)
    check_choice("loss_top_k", self.loss_top_k, (0, 1))
    check_choice("reverse_kl_top_1_mode", self.reverse_kl_top_1_mode, TOP1_REVERSE_MODES)
    if self.distillation_objective == "jsd" and self.loss_top_k == 1 and self.beta == 0:
        raise ValueError("loss_top_k=1 with beta=0 (TRL: the teacher's top-1 support only) is not supported; "
                         "allowed: beta > 0 or loss_top_k=0")


def _iw_cls():
    # TRL IWOPDConfig names; the jsd fields only act with distillation_objective="jsd"
    return make_run_config("iw_opd", _TEACHER + [
        ("iw_opd_gamma", float, 0.5),
        ("distillation_objective", str, "iw_opd"),  # iw_opd | jsd
        ("beta", float, 1.0),  # jsd: 0 forward KL, 1 reverse KL
        ("loss_top_k", int, 1),  # jsd: 1 sparse top-1 support, 0 full vocabulary
        ("loss_add_tail", bool, True),
        ("reverse_kl_top_1_mode", str, "sampled"),  # sampled | argmax
    ], defaults=_COMMON, validate=_validate_iw, doc="trlax train iw_opd: position-weighted on-policy distillation")


def _validate_self(self) -> None:
    from trlax.objectives.distillation import SELF_DISTILLATION_MODES

    check_range("num_generations", self.num_generations, low=1)
    if self.batch_size % self.num_generations:
        raise ValueError(f"num_generations={self.num_generations} must divide batch_size={self.batch_size}")
    check_choice("distillation_mode", self.distillation_mode, SELF_DISTILLATION_MODES)
    check_range("distillation_alpha", self.distillation_alpha, low=0.0, high=1.0)
    if self.distillation_mode == "sampled_token" and self.distillation_alpha != 1.0:
        raise ValueError(f"distillation_alpha={self.distillation_alpha!r} is not allowed with "
                         "distillation_mode='sampled_token'; allowed values: 1.0")
    check_range("distillation_topk", self.distillation_topk, low=1)
    check_range("distillation_is_clip", self.distillation_is_clip, low=0.0, low_inclusive=False, allow_none=True)
    check_range("teacher_update_rate", self.teacher_update_rate, low=0.0, high=1.0)
    check_choice("warm_start", self.warm_start, ("auto", "builtin", "off"))
    check_range("warm_start_steps", self.warm_start_steps, low=1)
    try:
        self.teacher_template.format(prompt="", demonstration="")
    except (KeyError, IndexError, ValueError):
        raise ValueError(f"teacher_template={self.teacher_template!r} may only use {{prompt}} and "
                         "{demonstration}") from None
    if "{demonstration}" not in self.teacher_template:
        raise ValueError(f"teacher_template={self.teacher_template!r} must contain {{demonstration}}")


def _self_cls(name: str, topk: int, G: int, is_clip):
    return make_run_config(name, [
        ("preset", str, ""),
        ("temperature", float, 1.0),
        ("num_generations", int, G),
        ("distillation_mode", str, "topk_logits"),  # topk_logits | full_logit | sampled_token
        ("distillation_alpha", float, 0.5),  # 0 forward KL, 1 reverse KL, else generalised JSD
        ("distillation_topk", int, topk),
        ("distillation_add_tail", bool, False),
        ("distillation_is_clip", Optional[float], is_clip),
        ("teacher_update_rate", float, 0.05),  # EMA rate of the teacher's weights (1: the current policy)
        ("teacher_template", str, "{prompt}{demonstration} {prompt}"),
        ("warm_start", str, "auto"),  # auto | builtin | off (see the module docstring)
        ("warm_start_steps", int, 120),
    ], defaults=_COMMON, validate=_validate_self, doc=f"trlax train {name}: self-distillation")


def _ssd_cls():
    return make_run_config("ssd", [("preset", str, ""), ("temperature", float, 0.6), ("top_k", int, 20),
                                   ("top_p", float, 0.95)], defaults=_COMMON,
                           doc="trlax train ssd: simple self-distillation (cross-entropy on own samples)")


def _specs() -> List[Any]:
    from trlax.train.registry import TrainerSpec

    def opd(cfg, rows=None):
        return run_opd(cfg, rows, "opd")

    def iw(cfg, rows=None):
        return run_opd(cfg, rows, "iw_opd")

    def sdft(cfg, rows=None):
        return run_self_distill(cfg, rows, "sdft")

    def sdpo(cfg, rows=None):
        return run_self_distill(cfg, rows, "sdpo")

    return [
        TrainerSpec("gkd", _gkd_cls, run_gkd, ("prompt", "completion"), D.sft_examples, metric="jsd",
                    presets={"gkd": dict(lmbda=0.5, beta=0.5, kd_temperature=1.0)},
                    description="GKD: generalised JSD to a teacher on student / dataset / teacher samples"),
        TrainerSpec("gold", _gold_cls, run_gold, ("prompt", "completion"), D.sft_examples, metric="uld",
                    presets={"gold": dict(lmbda=0.5, uld_distillation_weight=1.0, uld_crossentropy_weight=0.0)},
                    description="GOLD: cross-tokenizer distillation (ULD sorted-probability loss, arXiv 2402.12030)"),
        TrainerSpec("opd", _opd_cls, opd, ("prompt",), D.addition_examples, metric="sampled_reverse_kl",
                    presets={"opd": dict(kl_coef=1.0, temperature=1.0)},
                    description="on-policy distillation: per-token reverse-KL advantage on student samples"),
        TrainerSpec("iw_opd", _iw_cls, iw, ("prompt",), D.addition_examples, metric="sampled_reverse_kl",
                    presets={"iw_opd": dict(iw_opd_gamma=0.5, temperature=1.0)},
                    description="IW-OPD: on-policy distillation with position-bias importance weights"),
        TrainerSpec("sdft", lambda: _self_cls("sdft", 5, 1, None), sdft, ("prompt", "completion"), D.sft_examples,
                    metric="distillation_divergence",
                    presets={"sdft": dict(distillation_alpha=0.5, distillation_mode="topk_logits",
                                          distillation_topk=5)},
                    description="SDFT: self-distillation from the policy shown the demonstration"),
        TrainerSpec("sdpo", lambda: _self_cls("sdpo", 100, 4, 2.0), sdpo, ("prompt", "answer"),
                    D.addition_examples, metric="distillation_divergence",
                    presets={"sdpo": dict(distillation_alpha=0.5, distillation_mode="topk_logits",
                                          distillation_topk=100, distillation_is_clip=2.0, teacher_update_rate=0.05)},
                    description="SDPO: self-distillation from the policy shown a successful sibling sample"),
        TrainerSpec("ssd", _ssd_cls, run_ssd, ("prompt",), D.addition_examples, metric="nll",
                    presets={"ssd": dict(temperature=0.6, top_k=20, top_p=0.95)},
                    description="SSD: cross-entropy on the model's own samples (T=0.6, top-k 20, top-p 0.95)"),
    ]


SPECS = _specs()

__all__ = ["Teacher", "builtin_cross_teacher", "builtin_teacher", "completion_logits", "cross_tokenizer",
           "load_teacher", "run_gkd", "run_gold", "run_opd", "run_self_distill", "run_ssd"]
