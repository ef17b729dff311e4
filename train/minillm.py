"""MiniLLM behind ``trlax train minillm`` (Gu et al., "MiniLLM: Knowledge Distillation of Large Language
Models", arXiv 2306.08543, sec. 2.2, eq. 5-8).

The student minimises the *reverse* KL to the teacher by policy gradient on its own samples,
:func:`trlax.objectives.minillm_loss`: a long-term part on the (discounted, length-normalised, eq. 7) future
reward ``r_t = log p_T(y_t) − log q_θ(y_t)`` plus the exact single-step KL over the vocabulary (eq. 6).

- **Teacher-mixed sampling** (sec. 2.2, eq. 8): with ``teacher_mix_alpha = α > 0`` the completions are
  sampled token by token from ``p̃ = α·p_T + (1 − α)·q_θ``; each token's gradient is importance-weighted by
  ``w_t = q_θ(y_t) / p̃(y_t)`` (the paper's per-token approximation). The weight scales the cotangent of
  the student's logits at position ``t`` (``sg(z) + w·(z − sg(z))``): the objective's per-position terms
  depend only on the logits at that position (the rewards are stop-gradient), so the gradient is exactly
  ``Σ_t w_t ∇ℓ_t`` while the logged ``loss`` stays the value of :func:`~trlax.objectives.minillm_loss`.
  With ``α = 0`` the samples come from the student's :class:`trlax.rollouts.JaxSampler` (``w = 1``).
- **Pre-training loss** (sec. 2.2, ``L_PT``): with ``pt_coef > 0`` the loss adds ``pt_coef ×`` the NLL of the
  dataset's ``completion`` given its ``prompt`` (:func:`trlax.objectives.sft_loss`, global token count), the
  stand-in for the paper's pre-training corpus.

Defaults follow TRL's ``MiniLLMConfig`` (γ = 0, length normalisation, single-step decomposition,
``kd_temperature`` 1, no teacher mixing, no pre-training loss); ``--preset minillm`` the paper / LMOps
recipe (γ = 0.95, α = 0.2, ``L_PT`` coefficient 1, sampling temperature 1, no top-k / top-p).
Teachers as in :mod:`trlax.train.distill` (``teacher_model=builtin|PATH``)."""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives._checks import check_range
from trlax.train import data as D
from trlax.train import distill as KD
from trlax.train import loops as L
from trlax.train.config import make_run_config

_sg = jax.lax.stop_gradient


def make_teacher_mixed_sampler(student_graphdef, teacher_graphdef, max_new_tokens: int, *, alpha: float,
                               temperature: float, eos_id: int, pad_id: int):
    """Jitted ``(student_params, teacher_params, prompt_ids, prompt_mask, key) -> (ids [B, C], mask [B, C],
    weights [B, C])``: tokens sampled from ``p̃ = α·p_T + (1 − α)·q_θ`` (both at ``temperature``; MiniLLM
    eq. 8) and the importance weights ``q_θ(y_t) / p̃(y_t)`` (0 on padding), through
    :func:`trlax.rollouts.make_two_model_sampler`."""
    from trlax.rollouts import make_two_model_sampler

    log_a, log_1a = float(np.log(alpha)), float(np.log1p(-alpha))  # 0 < alpha < 1 (validated)

    def mix(z_student, z_teacher):
        lq, lp = (jax.nn.log_softmax(z.astype(jnp.float32) / temperature, axis=-1) for z in (z_student, z_teacher))
        return jnp.logaddexp(log_a + lp, log_1a + lq), lq

    gen = make_two_model_sampler(student_graphdef, teacher_graphdef, max_new_tokens, mix, eos_id=eos_id,
                                 pad_id=pad_id)

    def generate(*args):
        ids, mask, _, w = gen(*args)
        return ids, mask, w

    return generate


def run_minillm(cfg, rows=None, algo: str = "minillm") -> Dict[str, Any]:
    """MiniLLM (arXiv 2306.08543, alg. 1): per step, sample completions for a batch of prompts (from the
    student, or from the teacher mixture when ``teacher_mix_alpha > 0``), compute the teacher's logits on
    them and take one step on :func:`trlax.objectives.minillm_loss` (+ ``pt_coef·L_PT``). Logs
    ``reverse_kl`` (the exact per-position KL(q_θ ‖ p_T) at ``kd_temperature`` on the batch's positions,
    the spec metric), ``is_weight`` (mean importance weight) and, with ``L_PT``, ``pt_nll``. Held-out evaluation
    (``eval_dataset`` / ``eval_split``): the distillation trainers' (:func:`trlax.train.distill._evaluation`), one
    sample of the *student* per held-out prompt scored for accuracy against the row's ``completion`` /
    ``answer`` — with ``teacher_mix_alpha = 0`` the training step's sampler (its compiled program), else the
    student's own sampler at ``temperature`` (the mixture is not the student)."""
    from trlax.objectives.distillation import minillm_loss
    from trlax.objectives.supervised import sft_loss

    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = L.eval_records(algo, cfg, rows)
    use_pt = cfg.pt_coef > 0
    if use_pt and any("completion" not in r for r in rows):
        raise ValueError(f"pt_coef={cfg.pt_coef}: the pre-training loss needs a 'completion' column in "
                         f"dataset={cfg.dataset!r}")

    def loss_builder(run):
        def loss_fn(params, b, totals):
            model = run.policy.model(params)
            s = KD.completion_logits(model, b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
            s = _sg(s) + b["is_weight"][..., None].astype(s.dtype) * (s - _sg(s))  # eq. 8 weights, value s
            loss, m = minillm_loss(s, b["teacher_logits"], b["completion_ids"], b["mask"], gamma=cfg.gamma,
                                   length_normalize=cfg.length_normalize, single_step_coef=cfg.single_step_coef,
                                   temperature=cfg.kd_temperature, num_items=totals["num_items"])
            if use_pt:
                pt = KD.completion_logits(model, b["pt_prompt_ids"], b["pt_prompt_mask"], b["pt_ids"], b["pt_mask"])
                pt_loss, pm = sft_loss(KD._token_logps(pt, b["pt_ids"], b["pt_mask"]), b["pt_mask"],
                                       num_items=b["pt_num_items"][0])
                loss = loss + cfg.pt_coef * pt_loss
                m = dict(m, pt_nll=pm["nll"])
            return loss, m
        return loss_fn

    run = L._Run(algo, cfg, loss_builder)
    teacher = KD.load_teacher(cfg, run)
    tok = run.tokenizer
    P_ids, P_mask = KD._prompts(run, cfg, rows)
    if use_pt:
        C_ids, C_mask = D.encode_right_padded(tok, L._texts(tok, rows, "completion"), cfg.max_completion_length)
    if cfg.teacher_mix_alpha > 0:
        mixed = make_teacher_mixed_sampler(run.policy.sampler_graphdef, teacher.graphdef, cfg.max_completion_length,
                                           alpha=cfg.teacher_mix_alpha, temperature=cfg.temperature,
                                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    else:
        sampler = KD._sampler(run, cfg, temperature=cfg.temperature)
    if eval_rows is not None and cfg.teacher_mix_alpha > 0:  # the mixture is not the student: its own sampler
        sampler = KD._sampler(run, cfg, temperature=cfg.temperature)
    ev = KD._evaluation(run, cfg, eval_rows, algo, sampler) if eval_rows is not None else None
    KD._maybe_eval(run, ev, 0)
    data = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = data.next()
        s_params, key = run.policy.sampler_params(run.state.params), KD._step_key(cfg, step)
        if cfg.teacher_mix_alpha > 0:
            c_ids, c_mask, w = map(L._host, mixed(s_params, teacher.params, P_ids[idx], P_mask[idx], key))
            b = {"prompt_ids": P_ids[idx], "prompt_mask": P_mask[idx], "completion_ids": c_ids, "mask": c_mask}
        else:
            b = KD._roll_batch(sampler.generate(s_params, (P_ids[idx], P_mask[idx]), key))
            w = b["mask"].astype(np.float32)
        b["is_weight"] = w
        b["teacher_logits"] = teacher.logits(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["mask"])
        if use_pt:
            b.update(pt_prompt_ids=P_ids[idx], pt_prompt_mask=P_mask[idx], pt_ids=C_ids[idx], pt_mask=C_mask[idx],
                     pt_num_items=np.full(len(idx), C_mask[idx].sum(), np.float32))
        m = run.train_step(b)
        m["is_weight"] = KD._masked_mean(w, b["mask"])
        m["completion_length"] = float(b["mask"].sum(1).mean())
        run.logger.log(step, m, tokens=int(b["mask"].sum()))
        KD._maybe_eval(run, ev, step)
        run.maybe_checkpoint(step, {"data": data.state()})
    return KD._finish(run, cfg, algo, "reverse_kl", {"teacher_mix_alpha": cfg.teacher_mix_alpha, "gamma": cfg.gamma},
                      ev)


# ------------------------------------------------------------------------------------------ config


def _validate(self) -> None:
    KD._check_teacher(self)
    check_range("kd_temperature", self.kd_temperature, low=0.0, low_inclusive=False)
    check_range("gamma", self.gamma, low=0.0, high=1.0)
    check_range("single_step_coef", self.single_step_coef, low=0.0)
    check_range("teacher_mix_alpha", self.teacher_mix_alpha, low=0.0, high=1.0, high_inclusive=False)
    check_range("pt_coef", self.pt_coef, low=0.0)


def _config_cls():
    return make_run_config("minillm", KD._TEACHER + [
        ("kd_temperature", float, 1.0),  # temperature of the objective (student and teacher logits)
        ("gamma", float, 0.0),  # discount of the long-term reward (TRL 0; paper / LMOps 0.95)
        ("length_normalize", bool, True),  # eq. 7: future reward / number of future tokens
        ("single_step_coef", float, 1.0),  # weight of the exact single-step KL (eq. 6; 0 = off)
        ("teacher_mix_alpha", float, 0.0),  # eq. 8: sample from α·p_T + (1 − α)·q_θ (paper 0.2)
        ("pt_coef", float, 0.0),  # weight of the pre-training NLL on the dataset's completions (paper 1)
    ], defaults=KD._COMMON, validate=_validate,
        doc="trlax train minillm: MiniLLM reverse-KL policy-gradient distillation")


PRESETS = {"minillm": dict(gamma=0.95, length_normalize=True, single_step_coef=1.0, teacher_mix_alpha=0.2,
                           pt_coef=1.0, temperature=1.0, kd_temperature=1.0)}


def _specs():
    from trlax.train.registry import TrainerSpec

    return [TrainerSpec("minillm", _config_cls, run_minillm, ("prompt",), D.sft_examples, presets=PRESETS,
                        metric="reverse_kl",
                        description="MiniLLM: reverse-KL policy gradient (single-step + long-term) with "
                                    "teacher-mixed sampling")]


SPECS = _specs()

__all__ = ["PRESETS", "SPECS", "make_teacher_mixed_sampler", "run_minillm"]
