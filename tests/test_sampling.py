"""The sampler against a NumPy derivation of the release's loop (release.md C.1, A.3 step 5)."""

import jax
import jax.monitoring
import numpy as np
import pytest
from fixtures import TINY_I2V, TINY_T2V, tiny_dit_params
from numerics import rel_err

from m141jax import checkpoint, sampling
from m141jax.cli import main
from m141jax.config import to_json_dict
from m141jax.io import save_npz
from m141jax.models.conditioning import Conditioning
from m141jax.models.dit import dit_forward, init_params

SPEC_SIGMAS = {4: [1.0, 0.9375, 0.83333, 0.625, 0.0],
               8: [1.0, 0.97222, 0.9375, 0.89286, 0.83333, 0.75, 0.625, 0.41667, 0.0]}


def release_sigmas(steps, shift=5.0, reverse=True):
    """set_timesteps of the release's FlowMatchDiscreteScheduler, derived here in float64."""
    s = np.linspace(1.0, 0.0, steps + 1)
    s = shift * s / (1 + (shift - 1) * s)
    return s if reverse else 1 - s


def release_loop(velocity, noise, steps, shift, guidance, cond, uncond=None):
    """The release's predict_step loop: one DiT pass per branch, CFG combined outside, Euler in fp32."""
    sig = release_sigmas(steps, shift).astype(np.float32)
    x = noise.astype(np.float32)
    for i, t in enumerate(sig[:-1] * 1000):
        v = velocity(x, t, cond)
        if guidance > 1:
            vu = velocity(x, t, uncond)
            v = vu + guidance * (v - vu)
        x = x + v * (sig[i + 1] - sig[i])
    return x


@pytest.mark.parametrize("steps", [4, 8])
def test_schedule_values(steps):
    sig = sampling.schedule(steps, 5.0)
    assert sig.dtype == np.float32 and sig.shape == (steps + 1,)
    np.testing.assert_allclose(sig, SPEC_SIGMAS[steps], atol=5e-6)
    np.testing.assert_allclose(sig, release_sigmas(steps), atol=1e-6)
    np.testing.assert_allclose(sampling.timesteps(sig), 1000 * sig[:-1], rtol=1e-7)
    np.testing.assert_allclose(sampling.schedule(steps, 5.0, reverse=False), 1 - release_sigmas(steps), atol=1e-6)


def test_schedule_four_step_timesteps():
    np.testing.assert_allclose(sampling.timesteps(sampling.schedule(4)), [1000, 937.5, 833.3333, 625], rtol=1e-6)


def test_schedule_errors():
    with pytest.raises(ValueError, match="steps"):
        sampling.schedule(0)
    with pytest.raises(ValueError, match="shift"):
        sampling.schedule(4, 0.0)


@pytest.fixture(scope="module")
def i2v():
    return TINY_I2V, tiny_dit_params()


def _inputs(cfg, b=2, f=3, lt=8, seed=1):
    r = np.random.default_rng(seed)
    c = cfg.out_channels
    mask = np.zeros((b, lt), np.int32)
    for i in range(b):
        mask[i, : lt - 2 * i] = 1
    text = Conditioning(r.standard_normal((b, lt, cfg.text_dim), np.float32), mask,
                        r.standard_normal((b, cfg.pooled_dim), np.float32))
    # the unconditional branch keeps the image tokens (here the first 3) and swaps the prompt part
    neg_states = text.text_states.copy()
    neg_states[:, 3:] = r.standard_normal((b, lt - 3, cfg.text_dim), np.float32)
    neg_mask = np.zeros_like(mask)
    neg_mask[:, :6] = 1
    neg = Conditioning(neg_states, neg_mask, r.standard_normal((b, cfg.pooled_dim), np.float32))
    return dict(noise=r.standard_normal((b, f, 8, 8, c), np.float32),
                ref=r.standard_normal((b, 1, 8, 8, c), np.float32), text=text, neg=neg)


def _velocity_per_row(params, cfg, ref=None, guidance=None):
    """The DiT one sample at a time (the release's batch-1 passes)."""
    fwd = jax.jit(lambda x, t, c, r, g: dit_forward(params, cfg, x, t, c, r, g))

    def velocity(x, t, text):
        rows = []
        for i in range(x.shape[0]):
            row = jax.tree.map(lambda a, i=i: a[i:i + 1], text)
            rows.append(np.asarray(fwd(x[i:i + 1], np.full((1,), t, np.float32), row,
                                       None if ref is None else ref[i:i + 1],
                                       None if guidance is None else np.full((1,), guidance * 1000, np.float32))))
        return np.concatenate(rows)
    return velocity


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sample_matches_release_loop(i2v, guidance):
    cfg, params = i2v
    z = _inputs(cfg)
    out = np.asarray(sampling.sample(params, cfg, z["noise"], z["text"], sigmas=sampling.schedule(4),
                                     ref_latents=z["ref"], neg_text=z["neg"], guidance_scale=guidance))
    ref = release_loop(_velocity_per_row(params, cfg, z["ref"]), z["noise"], 4, 5.0, guidance, z["text"], z["neg"])
    assert out.dtype == np.float32 and out.shape == z["noise"].shape
    assert rel_err(out, ref) < 1e-5
    if guidance > 1:  # the unconditional branch really changed the result
        plain = release_loop(_velocity_per_row(params, cfg, z["ref"]), z["noise"], 4, 5.0, 1.0, z["text"])
        assert rel_err(plain, ref) > 1e-3


@pytest.mark.slow
def test_embedded_guidance_one_frame(tmp_path, run_parity):
    """The text-to-image form: the T2V DiT at one latent frame, guidance scale × 1000 as an input; the
    parity runner takes --guidance as that scale for such a DiT (no neg_* arrays)."""
    cfg = TINY_T2V
    params = init_params(cfg, jax.random.PRNGKey(2))
    z = _inputs(cfg, f=1)
    out = np.asarray(sampling.sample(params, cfg, z["noise"], z["text"], sigmas=sampling.schedule(8, 3.0),
                                     embedded_guidance=6.0))
    ref = release_loop(_velocity_per_row(params, cfg, guidance=6.0), z["noise"], 8, 3.0, 1.0, z["text"])
    assert rel_err(out, ref) < 1e-5
    other = np.asarray(sampling.sample(params, cfg, z["noise"], z["text"], sigmas=sampling.schedule(8, 3.0),
                                       embedded_guidance=1.0))
    assert rel_err(other, out) > 1e-3
    ckpt = checkpoint.save(tmp_path / "t2i", "dit", to_json_dict(cfg), params)
    got = run_parity("sample", ckpt, {"noise": np.moveaxis(z["noise"], -1, 1), **z["text"].to_dict()},
                     "--steps", "8", "--shift", "3.0", "--guidance", "6.0")
    assert rel_err(got["latents"], np.moveaxis(ref, -1, 1)) < 1e-5


class _Compiles:
    """Counts XLA backend compilations inside a `with` block."""

    def __enter__(self):
        self.n = 0
        jax.monitoring.register_event_duration_secs_listener(self._on)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._on)

    def _on(self, name, _secs, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            self.n += 1


def test_same_shapes_do_not_recompile(i2v):
    cfg, params = i2v
    z = _inputs(cfg, seed=3)

    def run(steps, shift, g, noise):
        return sampling.sample(params, cfg, noise, z["text"], sigmas=sampling.schedule(steps, shift),
                               ref_latents=z["ref"], neg_text=z["neg"], guidance_scale=g).block_until_ready()

    with _Compiles() as compiles:
        run(4, 5.0, 2.0, z["noise"])
        first = compiles.n
        run(4, 7.0, 4.5, z["noise"] + 1)  # new sigmas, scale and noise: the same program
        assert compiles.n == first
        run(8, 5.0, 2.0, z["noise"])  # a new step count is a new program (the counter works)
        assert compiles.n > first


def test_sample_errors(i2v):
    cfg, params = i2v
    z = _inputs(cfg)
    with pytest.raises(ValueError, match="unconditional"):
        sampling.sample(params, cfg, z["noise"], z["text"], sigmas=sampling.schedule(4), ref_latents=z["ref"],
                        guidance_scale=2.0)
    with pytest.raises(ValueError, match="no guidance embedding"):
        sampling.sample(params, cfg, z["noise"], z["text"], sigmas=sampling.schedule(4), ref_latents=z["ref"],
                        embedded_guidance=6.0)
    with pytest.raises(ValueError, match="batch"):
        sampling.sample(params, cfg, z["noise"][:1], z["text"], sigmas=sampling.schedule(4), ref_latents=z["ref"])


def test_parity_sample_cli(i2v, tmp_path, run_parity):
    """`python -m m141jax parity sample` in PyTorch layout, CFG on, against the release loop."""
    cfg, params = i2v
    z = _inputs(cfg, seed=4)
    ckpt = checkpoint.save(tmp_path / "dit", "dit", to_json_dict(cfg), params)
    cf = lambda a: np.moveaxis(a, -1, 1)
    inputs = {"noise": cf(z["noise"]), "ref_latents": cf(z["ref"]), **z["text"].to_dict()}
    out = run_parity("sample", ckpt, {**inputs, **z["neg"].to_dict("neg_")},
                     "--steps", "8", "--guidance", "2.5")
    ref = release_loop(_velocity_per_row(params, cfg, z["ref"]), z["noise"], 8, 5.0, 2.5, z["text"], z["neg"])
    assert rel_err(out["latents"], cf(ref)) < 1e-5
    np.testing.assert_allclose(out["sigmas"], release_sigmas(8), atol=1e-6)
    np.testing.assert_allclose(out["timesteps"], 1000 * release_sigmas(8)[:-1], rtol=1e-6)
    # without the neg_* arrays, CFG is refused (exit status 2, the missing arrays named)
    save_npz(tmp_path / "in2.npz", inputs)
    assert main(["parity", "sample", "--checkpoint", str(ckpt), "--inputs", str(tmp_path / "in2.npz"),
                 "--output", str(tmp_path / "out2.npz"), "--guidance", "2.5"]) == 2
