"""Offline preference trainers beyond the DPO family: ``trlax train kto | bco | orpo | cpo | tpo``.

=======  ===========================================================================  ==========================
trainer  objective (:mod:`trlax.objectives.unpaired`)                                 data
=======  ===========================================================================  ==========================
kto      KTO (Ethayarajh et al., arXiv 2402.01306, eq. 7-8) / unpaired APO-zero       prompt, completion, label
bco      BCO (Jung et al., arXiv 2404.04656, eq. 9; running reward mean δ, sec. 4.2)  prompt, completion, label
orpo     ORPO (Hong et al., arXiv 2403.07691, eq. 6-7), reference-free                prompt, chosen, rejected
cpo      CPO (arXiv 2401.08417, eq. 3) / SimPO (2405.14734) / AlphaPO (2501.03884)    prompt, chosen, rejected
tpo      TPO / TPO-L (Saeidi et al., arXiv 2405.16681, eq. 11 / 14)                   prompt, chosen, rejected,
                                                                                      reference (gold)
=======  ===========================================================================  ==========================

One loop serves all five (:func:`_offline_loop`): the columns are tokenised once (left-padded prompt block
``[N, P]``, one right-padded block ``[N, C]`` per completion column), each step draws a batch, and
:func:`_block_logps` scores every completion block after the shared prompt block in *one* forward.
KTO / BCO compare to the frozen initial policy (``run.frozen_params``), scored per batch; KTO's reference
point ``z₀`` comes from mismatched pairs ``(x_i, y_{i-1})`` (:func:`~trlax.objectives.kto_kl_pairs`)
scored by policy and reference. BCO's running moments live in ``TrainState.extra`` (checkpointed: a
resumed run is exact): the current moments enter the batch as ``[B]`` columns, the loss merges the
batch's rewards before using the mean δ (as TRL), and after the step the stored moments merge the whole
batch's rewards (Chan's parallel update) from the step's reward mean / second moment.

Micro-batching: ``orpo_loss`` / ``cpo_loss`` / ``tpo_loss`` average their pair term over the rows they are
given; :func:`_scaled` turns that into the micro-batch's share of the full-batch loss (exact; the identity
when ``num_microbatches = 1``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from trlax.objectives._checks import check_choice, check_range
from trlax.objectives.aggregation import Mean
from trlax.objectives import unpaired as U
from trlax.train import data as D
from trlax.train.config import make_run_config
from trlax.train.loops import _host, _Run, _texts, eval_first_last, eval_records, first_last
from trlax.train.registry import TrainerSpec

DEFAULTS = dict(batch_size=32, max_steps=60, learning_rate=1e-3, max_completion_length=4, max_prompt_length=8)

# ------------------------------------------------------------------------------------- built-in data


def unpaired_examples(n: int, seed: int = 0):
    """Unpaired rows of the built-in addition task (KTO / BCO): each preference pair of
    :func:`trlax.train.data.preference_examples` gives a desirable row (the right sum, ``label=True``) and
    an undesirable one (a wrong sum, ``label=False``)."""
    out = []
    for ex in D.preference_examples((n + 1) // 2, seed):
        out.append({"prompt": ex["prompt"], "completion": ex["chosen"], "label": True})
        out.append({"prompt": ex["prompt"], "completion": ex["rejected"], "label": False})
    return out[:n]


def triple_examples(n: int, seed: int = 0):
    """TPO rows of the built-in task: gold ``reference`` = the right sum, ``chosen`` = the right sum,
    ``rejected`` = a wrong sum (the toy task has one correct answer, so gold and chosen coincide)."""
    return [dict(ex, reference=ex["chosen"]) for ex in D.preference_examples(n, seed)]


# ------------------------------------------------------------------------------------------- helpers


def _block_logps(run, params, b, cols: Sequence[str]):
    """Per-token log-probs ``[B, C]`` of each completion block ``b[f"{col}_ids"]`` after the shared prompt
    block, from one forward over the ``len(cols) * B`` stacked rows."""
    k, n = len(cols), b["prompt_ids"].shape[0]
    logps, _ = run.policy.completion_logps(
        params, jnp.concatenate([b["prompt_ids"]] * k), jnp.concatenate([b["prompt_mask"]] * k),
        jnp.concatenate([b[f"{c}_ids"] for c in cols]), jnp.concatenate([b[f"{c}_mask"] for c in cols]))
    return [logps[i * n:(i + 1) * n] for i in range(k)]


def _scaled(objective, b, totals, **kw):
    """``objective(..., num_items=…)`` as this micro-batch's share of the full-batch loss: the pair term of
    ORPO / CPO / TPO is a mean over the rows given, so the loss is scaled by ``rows / global rows`` and the
    NLL's token count divided by the same factor (its share stays ``Σ / global tokens``)."""
    share = b["prompt_ids"].shape[0] / totals["num_sequences"]
    loss, metrics = objective(num_items=totals["num_items"] * share, **kw)
    return loss * share, metrics


def _kw(cfg, names):
    return {n: getattr(cfg, n) for n in names}


def _offline_loop(algo: str, cfg, rows, cols: Sequence[str], loss_builder, *, mask_col: str,
                  add: Optional[Callable] = None, after: Optional[Callable] = None, extra_state_fn=None,
                  metric: str = "rewards/accuracies") -> Dict[str, Any]:
    """Tokenise ``rows`` once, then ``max_steps`` steps on shuffled batches. ``batch["mask"]`` =
    ``{mask_col}_mask`` (the tokens ``num_items`` counts); ``add(run, batch) -> dict`` adds host columns
    (reference log-probs, BCO moments) before the step; ``after(run, metrics)`` runs after it."""
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows
    rows, eval_rows = eval_records(algo, cfg, rows)
    run = _Run(algo, cfg, loss_builder, extra_state_fn=extra_state_fn)
    tok = run.tokenizer

    def encode_rows(sel):
        P_ids, P_mask = D.encode_left_padded(tok, _texts(tok, sel, "prompt"), cfg.max_prompt_length)
        out = {"prompt_ids": P_ids, "prompt_mask": P_mask}
        for c in cols:
            out[f"{c}_ids"], out[f"{c}_mask"] = D.encode_right_padded(tok, _texts(tok, sel, c),
                                                                      cfg.max_completion_length)
        if "label" in sel[0]:
            out["labels"] = np.asarray([bool(r["label"]) for r in sel])
        return out

    table = encode_rows(rows)  # every training row, tokenised once
    sampler = D.EpochSampler(len(rows), cfg.batch_size, cfg.seed, **run.meta.get("data", {}))

    def complete(batch):
        batch["mask"] = batch[f"{mask_col}_mask"]
        if add is not None:
            batch.update(add(run, batch))
        return batch

    def evaluate(step):  # held-out implicit-reward accuracy (paired trainers) and margin, as run_dpo
        run.eval_batches(eval_rows, lambda sel: complete(encode_rows(sel)), step, weight_keys=(
            "loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected"), derive=_margins)

    if eval_rows is not None and run.start_step == 0:
        evaluate(0)
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        idx = sampler.next()
        batch = complete({k: v[idx] for k, v in table.items()})
        m = run.train_step(batch)
        if after is not None:
            after(run, m)
        m.update(_margins(m))
        run.logger.log(step, m, tokens=int(sum(batch[f"{c}_mask"].sum() for c in cols)))
        if eval_rows is not None and run.due_eval(step, step - 1):
            evaluate(step)
        run.maybe_checkpoint(step, {"data": sampler.state()})
    hist = run.logger.history
    first, last = first_last([r["loss"] for r in hist])
    m_first, m_last = first_last([r.get(metric, np.nan) for r in hist])
    line = f"mean loss: first 10% of steps {first:.4f} -> last 10% {last:.4f}; {metric} {m_first:.3f} -> {m_last:.3f}"
    tag = {"rewards/accuracies": "accuracy", "rewards/margins": "margin"}.get(metric, metric)  # as run_dpo
    summary = {"algorithm": algo, "loss_type": getattr(cfg, "loss_type", algo), "steps": cfg.max_steps,
               "loss_first_10pct": first, "loss_last_10pct": last,
               f"{tag}_first_10pct": m_first, f"{tag}_last_10pct": m_last}
    if eval_rows is not None:  # as run_dpo: eval_{accuracy, margin}_{first, last} (accuracy: paired trainers)
        held = []
        for key, name in (("rewards/accuracies", "accuracy"), ("rewards/margins", "margin")):
            if any(f"eval/{key}" in r for r in run.logger.eval_history):
                summary[f"eval_{name}_first"], summary[f"eval_{name}_last"] = eval_first_last(run, key)
                held.append(f"{name} {summary[f'eval_{name}_first']:.3f} -> {summary[f'eval_{name}_last']:.3f}")
        line += f"; held-out ({len(eval_rows)} rows) reward " + ", ".join(held)
    print(line)
    return run.finish(summary)


def _margins(m: Dict[str, float]) -> Dict[str, float]:
    """``rewards/margins`` = chosen − rejected mean reward where the objective logs only those (KTO, BCO)."""
    if "rewards/margins" not in m and "rewards/chosen" in m and "rewards/rejected" in m:
        return {"rewards/margins": m["rewards/chosen"] - m["rewards/rejected"]}
    return {}


def _ref_columns(run, batch, cols):
    """``ref_{col}``: the frozen initial policy's per-token log-probs of each completion block."""
    if not hasattr(run, "_ref_fn"):
        run._ref_fn = jax.jit(lambda p, b: _block_logps(run, p, b, cols))
    b = {k: v for k, v in batch.items() if k.startswith(("prompt_",) + tuple(f"{c}_" for c in cols))}
    return {f"ref_{c}": _host(x) for c, x in zip(cols, run._ref_fn(run.frozen_params, b))}


# ----------------------------------------------------------------------------------------------- KTO


def run_kto(cfg, rows=None, algo: str = "kto") -> Dict[str, Any]:
    """KTO (arXiv 2402.01306, eq. 7-8; TRL ``KTOTrainer``) with ``z₀`` from mismatched pairs
    (``loss_type="kto"``), or unpaired APO-zero (arXiv 2408.06266, ``loss_type="apo_zero_unpaired"``)."""
    use_kl = cfg.loss_type == "kto"
    cols = ("completion", "kl") if use_kl else ("completion",)

    def loss_builder(run):
        def loss_fn(params, b, totals):
            lp = _block_logps(run, params, b, cols)
            kl = dict(kl_logps=lp[1], ref_kl_logps=b["ref_kl"], kl_mask=b["kl_mask"]) if use_kl else {}
            return U.kto_loss(lp[0], b["ref_completion"], b["labels"], mask=b["completion_mask"],
                              num_sequences=totals["num_sequences"], **kl,
                              **_kw(cfg, ("beta", "desirable_weight", "undesirable_weight", "loss_type")))
        return loss_fn

    def add(run, batch):
        if use_kl:  # (x_i, y_{i-1}): completions rolled one row down the batch (TRL's KL pairs)
            batch["kl_ids"], batch["kl_mask"] = (np.asarray(a) for a in U.kto_kl_pairs(
                (batch["completion_ids"], batch["completion_mask"])))
        return _ref_columns(run, batch, cols)

    return _offline_loop(algo, cfg, rows, ("completion",), loss_builder, mask_col="completion", add=add,
                         metric="rewards/margins")


# ----------------------------------------------------------------------------------------------- BCO


def prompt_embeddings(run, ids, mask) -> np.ndarray:
    """``[N, H]`` UDM prompt embeddings: the frozen initial policy's final hidden states mean-pooled over the
    prompt tokens (TRL's BCO takes a user ``embedding_func``; trlax uses the reference model), computed in
    chunks of ``batch_size`` rows (one compiled forward)."""
    if not hasattr(run, "_embed_fn"):
        def embed(p, i, m):
            h = run.policy.model(p).hidden_states(i, attention_mask=m).astype(jnp.float32)
            return jnp.sum(h * m[..., None], 1) / jnp.maximum(jnp.sum(m, 1, keepdims=True), 1)
        run._embed_fn = jax.jit(embed)
    n, bs = len(ids), run.cfg.batch_size
    pad = -n % bs
    ids = np.concatenate([ids, np.zeros((pad, ids.shape[1]), ids.dtype)])
    mask = np.concatenate([mask, np.zeros((pad, mask.shape[1]), bool)])
    return np.concatenate([_host(run._embed_fn(run.frozen_params, ids[i:i + bs], mask[i:i + bs]))
                           for i in range(0, n + pad, bs)])[:n]


def fit_udm(run, cfg, rows) -> U.UDMClassifier:
    """BCO's UDM classifier (arXiv 2404.04656, sec. 4.3; TRL ``BCOTrainer``): :func:`trlax.objectives.bco_udm_fit`
    on the :func:`prompt_embeddings` of up to ``prompt_sample_size`` rows (a sample fixed by the seed, so a
    resumed run refits the same classifier), desirable = 1."""
    tok = run.tokenizer
    sample = np.sort(np.random.default_rng([cfg.seed, 1]).permutation(len(rows))[:cfg.prompt_sample_size])
    ids, mask = D.encode_left_padded(tok, _texts(tok, [rows[i] for i in sample], "prompt"), cfg.max_prompt_length)
    labels = np.asarray([bool(rows[i]["label"]) for i in sample])
    if labels.all() or not labels.any():
        raise ValueError(f"use_udm=True needs desirable and undesirable rows among the prompt_sample_size="
                         f"{cfg.prompt_sample_size} sampled rows of dataset={cfg.dataset!r}")
    return U.bco_udm_fit(prompt_embeddings(run, ids, mask), labels)


def run_bco(cfg, rows=None, algo: str = "bco") -> Dict[str, Any]:
    """BCO (arXiv 2404.04656, eq. 9): a binary classifier on the implicit reward ``β(log π_θ − log π_ref)``
    shifted by the running reward mean δ (sec. 4.2), kept in ``TrainState.extra``. With ``use_udm``, the
    undesirable rows are weighted by the clipped density ratio of a prompt classifier (UDM, sec. 4.3;
    :func:`fit_udm` before the first step, :func:`trlax.objectives.bco_udm_weights` per batch)."""
    rows = D.load_records(algo, cfg.dataset, seed=cfg.seed) if rows is None else rows

    def loss_builder(run):
        def loss_fn(params, b, totals):
            (lp,) = _block_logps(run, params, b, ("completion",))
            state = U.BCOState(b["bco_mean"][0], b["bco_var"][0], b["bco_count"][0])
            loss, _, metrics = U.bco_loss(lp, b["ref_completion"], b["labels"], state, mask=b["completion_mask"],
                                          beta=cfg.beta, update_state=True, num_sequences=totals["num_sequences"],
                                          weights=b["udm_weights"] if cfg.use_udm else None)
            r = cfg.beta * jax.lax.stop_gradient(
                jnp.sum(jnp.where(b["completion_mask"], lp - b["ref_completion"], 0.0), axis=-1))
            n = jnp.asarray(r.shape[0], jnp.float32)
            metrics.update({"rewards/mean": Mean(jnp.sum(r), n), "bco/reward_sq": Mean(jnp.sum(r * r), n)})
            return loss, metrics
        return loss_fn

    def add(run, batch):
        n = batch["prompt_ids"].shape[0]
        out = {f"bco_{k}": np.full(n, float(_host(v)), np.float32) for k, v in run.state.extra._asdict().items()}
        out.update(_ref_columns(run, batch, ("completion",)))
        if cfg.use_udm:
            if not hasattr(run, "_udm"):
                run._udm = fit_udm(run, cfg, rows)
            probs = U.bco_udm_probs(run._udm, prompt_embeddings(run, batch["prompt_ids"], batch["prompt_mask"]))
            out["udm_weights"] = np.asarray(U.bco_udm_weights(
                probs, min_density_ratio=cfg.min_density_ratio, max_density_ratio=cfg.max_density_ratio,
                labels=batch["labels"]), np.float32)
        return out

    def after(run, m):
        # Chan's parallel merge of the stored moments with the whole batch's rewards (bco_update_moments,
        # fed the batch mean / variance instead of the rewards themselves); a skipped (non-finite) step leaves them
        if run.last_skipped:
            m.pop("bco/reward_sq", None)
            return
        mean, var, count = (float(_host(v)) for v in run.state.extra)
        n, b_mean = float(cfg.batch_size), m["rewards/mean"]
        b_var = max(m.pop("bco/reward_sq") - b_mean ** 2, 0.0)
        tot, d = count + n, b_mean - mean
        new = U.BCOState(*(np.float32(x) for x in (mean + d * n / tot, (var * count + d * d * count * n / tot
                                                                        + b_var * n) / tot, tot)))
        run.state = run.state._replace(extra=jax.device_put(new, run.state_sharding.extra))

    return _offline_loop(algo, cfg, rows, ("completion",), loss_builder, mask_col="completion", add=add,
                         after=after, extra_state_fn=lambda _: U.bco_init(), metric="rewards/margins")


# ---------------------------------------------------------------------------------- ORPO / CPO / TPO


def run_orpo(cfg, rows=None, algo: str = "orpo") -> Dict[str, Any]:
    """ORPO (arXiv 2403.07691, eq. 6-7): chosen NLL − λ·log σ(log odds ratio), no reference model. The NLL
    is over the chosen *completion* tokens (the paper's L_SFT; TRL also counts the prompt tokens)."""

    def loss_builder(run):
        def loss_fn(params, b, totals):
            ch, rj = _block_logps(run, params, b, ("chosen", "rejected"))
            return _scaled(U.orpo_loss, b, totals, chosen_logps=ch, rejected_logps=rj,
                           chosen_mask=b["chosen_mask"], rejected_mask=b["rejected_mask"], beta=cfg.beta)
        return loss_fn

    return _offline_loop(algo, cfg, rows, ("chosen", "rejected"), loss_builder, mask_col="chosen")


CPO_FIELDS = ("loss_type", "beta", "label_smoothing", "simpo_gamma", "alpha", "cpo_alpha")


def run_cpo(cfg, rows=None, algo: str = "cpo") -> Dict[str, Any]:
    """CPO (arXiv 2401.08417, eq. 3) and its reference-free relatives SimPO (arXiv 2405.14734, eq. 6) and
    AlphaPO (arXiv 2501.03884, eq. 5-6), hinge and IPO: ``mean ℓ(x) + cpo_alpha·NLL(chosen)``."""

    def loss_builder(run):
        def loss_fn(params, b, totals):
            ch, rj = _block_logps(run, params, b, ("chosen", "rejected"))
            return _scaled(U.cpo_loss, b, totals, chosen_logps=ch, rejected_logps=rj, chosen_mask=b["chosen_mask"],
                           rejected_mask=b["rejected_mask"], **_kw(cfg, CPO_FIELDS))
        return loss_fn

    return _offline_loop(algo, cfg, rows, ("chosen", "rejected"), loss_builder, mask_col="chosen")


TPO_FIELDS = ("loss_type", "beta", "tpo_alpha", "tpo_l_gamma", "label_smoothing")


def run_tpo(cfg, rows=None, algo: str = "tpo") -> Dict[str, Any]:
    """TPO (arXiv 2405.16681, eq. 11; TPO-L eq. 14): reference-free chosen / rejected contrast plus
    ``tpo_alpha`` × the NLL of the gold ``reference`` completion (not scored when ``tpo_alpha = 0``)."""
    cols = ("chosen", "rejected") + (("reference",) if cfg.tpo_alpha else ())

    def loss_builder(run):
        def loss_fn(params, b, totals):
            lp = _block_logps(run, params, b, cols)
            gold = lp[2] if len(lp) > 2 else None
            return _scaled(U.tpo_loss, b, totals, chosen_logps=lp[0], rejected_logps=lp[1], gold_logps=gold,
                           chosen_mask=b["chosen_mask"], rejected_mask=b["rejected_mask"],
                           gold_mask=b["reference_mask"], **_kw(cfg, TPO_FIELDS))
        return loss_fn

    return _offline_loop(algo, cfg, rows, ("chosen", "rejected", "reference"), loss_builder,
                         mask_col="reference")


# ------------------------------------------------------------------------------------------- configs


def _pos(name, cfg, strict=True):
    check_range(name, getattr(cfg, name), low=0.0, low_inclusive=not strict)


def _validate_kto(cfg):
    _pos("beta", cfg)
    _pos("desirable_weight", cfg, strict=False)
    _pos("undesirable_weight", cfg, strict=False)
    check_choice("loss_type", cfg.loss_type, U.KTO_LOSS_TYPES)
    if cfg.loss_type == "kto" and cfg.batch_size < 2:
        raise ValueError(f"batch_size={cfg.batch_size} must be >= 2 for loss_type='kto' (the KL reference "
                         "point pairs each prompt with another row's completion)")


def _validate_bco(cfg):
    _pos("beta", cfg)
    check_range("prompt_sample_size", cfg.prompt_sample_size, low=2)
    check_range("min_density_ratio", cfg.min_density_ratio, low=0.0)
    check_range("max_density_ratio", cfg.max_density_ratio, low=cfg.min_density_ratio)


def _validate_cpo(cfg):
    check_choice("loss_type", cfg.loss_type, U.CPO_LOSS_TYPES)
    _pos("beta", cfg)
    check_range("label_smoothing", cfg.label_smoothing, low=0.0, high=0.5)
    check_range("simpo_gamma", cfg.simpo_gamma)
    check_range("alpha", cfg.alpha)
    _pos("cpo_alpha", cfg, strict=False)


def _validate_tpo(cfg):
    check_choice("loss_type", cfg.loss_type, U.TPO_LOSS_TYPES)
    _pos("beta", cfg)
    _pos("tpo_alpha", cfg, strict=False)
    check_range("tpo_l_gamma", cfg.tpo_l_gamma)
    check_range("label_smoothing", cfg.label_smoothing, low=0.0, high=0.5)


def _cfg(name, fields, validate, doc):
    return lambda: make_run_config(name, [("preset", str, "")] + fields, defaults=DEFAULTS, validate=validate,
                                   doc=doc)


PAIRED = ("prompt", "chosen", "rejected")

SPECS = [
    TrainerSpec(
        "kto", _cfg("kto", [("beta", float, 0.1), ("desirable_weight", float, 1.0),
                            ("undesirable_weight", float, 1.0), ("loss_type", str, "kto")], _validate_kto,
                    "trlax train kto: KTO (arXiv 2402.01306) on unpaired (prompt, completion, label) rows."),
        run_kto, ("prompt", "completion", "label"), unpaired_examples, metric="rewards/margins",
        presets={"kto": dict(loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)},
        description="KTO (2402.01306), unpaired; KL reference point from mismatched pairs; apo_zero_unpaired"),
    TrainerSpec(
        "bco", _cfg("bco", [("beta", float, 0.1), ("use_udm", bool, False), ("prompt_sample_size", int, 1024),
                            ("min_density_ratio", float, 0.5), ("max_density_ratio", float, 10.0)], _validate_bco,
                    "trlax train bco: BCO (arXiv 2404.04656) on unpaired (prompt, completion, label) rows."),
        run_bco, ("prompt", "completion", "label"), unpaired_examples, metric="rewards/margins",
        presets={"bco": dict(beta=0.1)},
        description="BCO (2404.04656), unpaired; running reward mean δ in the train state; UDM (`use_udm`)"),
    TrainerSpec(
        "orpo", _cfg("orpo", [("beta", float, 0.1)], lambda c: _pos("beta", c, strict=False),
                     "trlax train orpo: ORPO (arXiv 2403.07691), reference-free, paired."),
        run_orpo, PAIRED, D.preference_examples, metric="rewards/accuracies", presets={"orpo": dict(beta=0.1)},
        description="ORPO (2403.07691): NLL + odds-ratio term, reference-free"),
    TrainerSpec(
        "cpo", _cfg("cpo", [("loss_type", str, "sigmoid"), ("beta", float, 0.1), ("label_smoothing", float, 0.0),
                            ("simpo_gamma", float, 0.5), ("alpha", float, 0.0), ("cpo_alpha", float, 1.0)],
                    _validate_cpo, "trlax train cpo: CPO / SimPO / AlphaPO (reference-free, paired)."),
        run_cpo, PAIRED, D.preference_examples, metric="rewards/accuracies",
        presets={"cpo": dict(loss_type="sigmoid", cpo_alpha=1.0, beta=0.1),
                 "simpo": dict(loss_type="simpo", beta=2.5, simpo_gamma=1.375, cpo_alpha=0.0),
                 "alphapo": dict(loss_type="alphapo", alpha=0.25, beta=2.5, simpo_gamma=0.1, cpo_alpha=0.0)},
        description="CPO (2401.08417), SimPO (2405.14734), AlphaPO (2501.03884); hinge / ipo"),
    TrainerSpec(
        "tpo", _cfg("tpo", [("loss_type", str, "sigmoid"), ("beta", float, 0.01), ("tpo_alpha", float, 1.0),
                            ("tpo_l_gamma", float, 0.5), ("label_smoothing", float, 0.0)], _validate_tpo,
                    "trlax train tpo: TPO / TPO-L (arXiv 2405.16681) on (prompt, chosen, rejected, reference)."),
        run_tpo, PAIRED + ("reference",), triple_examples, metric="rewards/accuracies",
        presets={"tpo": dict(loss_type="sigmoid", tpo_alpha=1.0, beta=0.01),
                 "tpo_l": dict(loss_type="tpo-l", tpo_l_gamma=0.5)},
        description="TPO / TPO-L (2405.16681): preference contrast + gold-response NLL, reference-free"),
]

__all__ = ["SPECS", "fit_udm", "prompt_embeddings", "run_bco", "run_cpo", "run_kto", "run_orpo", "run_tpo", "triple_examples",
           "unpaired_examples"]
