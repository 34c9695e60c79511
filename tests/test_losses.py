"""LSR and RALT losses against float64 NumPy references on random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrag_jax.finetune.losses import lsr_loss, ralt_loss


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_lsr(scores, lm, tau_r, tau_lm, mask=None):
    log_p = np_log_softmax(scores / tau_r)
    log_q = np_log_softmax(lm / tau_lm)
    kl = (np.exp(log_q) * (log_q - log_p)).sum(-1)
    if mask is None:
        return kl.mean()
    return (kl * mask).sum() / mask.sum()


def np_ralt(logits, labels, mask, weights=None):
    logp = np_log_softmax(logits)
    ce = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    m = mask.astype(np.float64) * (1.0 if weights is None else weights[:, None])
    return (ce * m).sum() / m.sum()


@pytest.mark.parametrize("tau_r,tau_lm", [(1.0, 1.0), (0.1, 0.5), (2.0, 3.0)])
def test_lsr_loss_matches_numpy(tau_r, tau_lm):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(6, 5)) * 3
    lm = -np.abs(rng.normal(size=(6, 5))) * 20  # log-probs of multi-token answers: << 0
    got = float(lsr_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(lm, jnp.float32),
                         tau_retrieval=tau_r, tau_lm=tau_lm))
    np.testing.assert_allclose(got, np_lsr(scores, lm, tau_r, tau_lm), rtol=1e-5, atol=1e-6)
    mask = np.array([1, 1, 0, 1, 0, 1], bool)
    got = float(lsr_loss(jnp.asarray(scores), jnp.asarray(lm), tau_retrieval=tau_r,
                         tau_lm=tau_lm, mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got, np_lsr(scores, lm, tau_r, tau_lm, mask), rtol=1e-5)


def test_lsr_gradient_flows_only_into_retrieval_scores():
    rng = np.random.default_rng(1)
    scores = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    lm = jnp.asarray(rng.normal(size=(3, 4)) * 5, jnp.float32)
    g_scores, g_lm = jax.grad(lambda s, lm_: lsr_loss(s, lm_), argnums=(0, 1))(scores, lm)
    assert np.abs(np.asarray(g_scores)).max() > 1e-3
    assert np.all(np.asarray(g_lm) == 0.0)
    # analytic gradient of KL(Q || softmax(s)) w.r.t. s is (P - Q) / B
    p = np.exp(np_log_softmax(np.asarray(scores, np.float64)))
    q = np.exp(np_log_softmax(np.asarray(lm, np.float64)))
    np.testing.assert_allclose(np.asarray(g_scores), (p - q) / 3, atol=1e-6)


def test_lsr_loss_is_zero_when_distributions_agree():
    s = jnp.asarray(np.random.default_rng(2).normal(size=(4, 3)), jnp.float32)
    assert abs(float(lsr_loss(s, s))) < 1e-6


def test_ralt_loss_matches_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 7, 11)) * 2
    labels = rng.integers(0, 11, size=(4, 7))
    mask = rng.random((4, 7)) > 0.4
    mask[:, 0] = True
    got = float(ralt_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                          jnp.asarray(mask)))
    np.testing.assert_allclose(got, np_ralt(logits, labels, mask), rtol=1e-5)
    weights = rng.random(4)
    got = float(ralt_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
                          jnp.asarray(mask), jnp.asarray(weights, jnp.float32)))
    np.testing.assert_allclose(got, np_ralt(logits, labels, mask, weights), rtol=1e-5)
