"""The two losses of RA-DIT, as pure functions of arrays.

LSR (LM-supervised retrieval; REPLUG, Shi et al. 2023; RA-DIT, Lin et al. 2023), for a
query x with top-k passages d_1..d_k:

    P_R(d | x)    = softmax_k( s(x, d) / tau_R )                 s = <q_theta(x), e_d>
    Q_LM(d | x,y) = softmax_k( log p_LM(y | prompt(x, d)) / tau_LM )  generator frozen
    L_LSR         = mean_x KL( Q_LM || P_R ) = mean_x sum_d Q_LM (log Q_LM - log P_R)

Direction. Both papers write the objective as KL(P_R || Q_LM). What is implemented is
KL(Q_LM || P_R): the LM's distribution is the fixed target (stop-gradient) and the loss is
the cross-entropy of P_R under it, minus the target's (constant) entropy. Both directions
are zero exactly when P_R = Q_LM. This one is the distillation direction: its gradient in
the scores is (P_R - Q_LM) / tau_R, bounded and never vanishing while the two differ, and
it is mass-covering: every passage the LM finds useful must get retriever probability,
where KL(P_R || Q_LM) lets P_R drop such passages and collapse onto one. It is also what
the usual implementation of the papers' loss computes (``kl_div(log P_R, Q_LM)`` in
PyTorch, whose arguments read the other way round; FedRAG's LSRLoss does this).

RALT (retrieval-augmented LM training): token cross-entropy on the response + EOS only,
averaged over those tokens; each (example, passage) instance may carry a weight (e.g. its
retrieval probability P_R(d | x)).

For gradient accumulation the train step needs sums, not means: ``lsr_kl`` gives one KL per
example and ``ralt_loss_sum`` the weighted token sum with its weight; the means below are
those sums divided once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lsr_kl(retrieval_scores: jax.Array, lm_logprobs: jax.Array, *, tau_retrieval: float = 1.0,
           tau_lm: float = 1.0) -> jax.Array:
    """[B] KL(Q_LM || P_R) per example (see the module docstring for the direction).

    retrieval_scores: [B, k] raw similarities s(x, d) (gradient flows into them).
    lm_logprobs:      [B, k] log p_LM(y | prompt(x, d)) (treated as constants).
    """
    log_p_r = jax.nn.log_softmax(retrieval_scores.astype(jnp.float32) / tau_retrieval, axis=-1)
    log_q = jax.nn.log_softmax(
        jax.lax.stop_gradient(lm_logprobs.astype(jnp.float32)) / tau_lm, axis=-1)
    return jnp.sum(jnp.exp(log_q) * (log_q - log_p_r), axis=-1)


def lsr_loss(retrieval_scores: jax.Array, lm_logprobs: jax.Array, *, tau_retrieval: float = 1.0,
             tau_lm: float = 1.0, mask: jax.Array | None = None) -> jax.Array:
    """KL(Q_LM || P_R) averaged over the batch (``mask``: [B] bool, False for padding rows
    of a fixed-shape batch)."""
    kl = lsr_kl(retrieval_scores, lm_logprobs, tau_retrieval=tau_retrieval, tau_lm=tau_lm)
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log softmax(logits)[label] per position, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def ralt_loss_sum(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
                  weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(sum_i w_i sum_t m_it ce_it, sum_i w_i sum_t m_it): the weighted cross-entropy of
    the labelled tokens and the weight it is divided by for the mean (:func:`ralt_loss`).

    logits [N, T, V] predict labels [N, T] (already shifted: logits[:, t] predicts
    labels[:, t]); label_mask [N, T] is True on response + EOS tokens only; weights [N].
    """
    m = label_mask.astype(jnp.float32)
    if weights is not None:
        m = m * weights.astype(jnp.float32)[:, None]
    ce = -token_logprobs(logits, labels)
    return jnp.sum(ce * m), jnp.sum(m)


def ralt_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
              weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over labelled tokens (response + EOS), optionally weighted:
    sum_i w_i sum_t m_it ce_it / sum_i w_i sum_t m_it."""
    total, weight = ralt_loss_sum(logits, labels, label_mask, weights)
    return total / jnp.maximum(weight, 1e-9)
