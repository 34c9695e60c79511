"""The two losses of RA-DIT, as pure functions of arrays.

LSR (LM-supervised retrieval, REPLUG / RA-DIT), for a query x with top-k passages d_1..d_k:

    P_R(d | x)    = softmax_k( s(x, d) / tau_R )                 s = <q_theta(x), e_d>
    Q_LM(d | x,y) = softmax_k( log p_LM(y | prompt(x, d)) / tau_LM )  generator frozen
    L_LSR         = mean_x KL( Q_LM || P_R )

RALT (retrieval-augmented LM training): token cross-entropy on the response + EOS only,
averaged over those tokens; each (example, passage) instance may carry a weight (e.g. its
retrieval probability P_R(d | x)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def lsr_loss(retrieval_scores: jax.Array, lm_logprobs: jax.Array, *, tau_retrieval: float = 1.0,
             tau_lm: float = 1.0, mask: jax.Array | None = None) -> jax.Array:
    """KL(Q_LM || P_R) averaged over the batch.

    retrieval_scores: [B, k] raw similarities s(x, d) (gradient flows into them).
    lm_logprobs:      [B, k] log p_LM(y | prompt(x, d)) (treated as constants).
    mask:             optional [B] bool, False for padding rows of a fixed-shape batch.
    """
    log_p_r = jax.nn.log_softmax(retrieval_scores.astype(jnp.float32) / tau_retrieval, axis=-1)
    log_q = jax.nn.log_softmax(
        jax.lax.stop_gradient(lm_logprobs.astype(jnp.float32)) / tau_lm, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p_r), axis=-1)  # [B]
    if mask is None:
        return jnp.mean(kl)
    mask = mask.astype(jnp.float32)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """log softmax(logits)[label] per position, computed in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def ralt_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
              weights: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over labelled tokens (response + EOS), optionally weighted.

    logits [N, T, V] predict labels [N, T] (already shifted: logits[:, t] predicts
    labels[:, t]); label_mask [N, T] is True on response + EOS tokens only;
    weights [N] scale each instance:  sum_i w_i sum_t m_it ce_it / sum_i w_i sum_t m_it.
    """
    m = label_mask.astype(jnp.float32)
    if weights is not None:
        m = m * weights.astype(jnp.float32)[:, None]
    ce = -token_logprobs(logits, labels)
    return jnp.sum(ce * m) / jnp.maximum(jnp.sum(m), 1e-9)
