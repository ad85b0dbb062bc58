"""fastllm.ops.backends: availability, explicit choices, FASTLLM_KERNELS parsing and clear errors."""
import pytest

from fastllm.ops import backends


@pytest.fixture(autouse=True)
def _fresh_cache():
    backends._select.cache_clear()
    yield
    backends._select.cache_clear()


def test_available_is_ordered_fastest_first_and_always_has_reference():
    avail = backends.available("layer_norm", "cpu")
    assert avail[-1] in ("reference", "triton") and "reference" in avail
    assert avail[0] == backends.select("layer_norm", "cpu")


def test_unavailable_backend_names_op_backend_and_reason():
    with pytest.raises(backends.BackendUnavailable, match=r"layer_norm: backend 'cuda' is unavailable on cpu: .*cuda"):
        backends.select("layer_norm", "cpu", "cuda")


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.select("layer_norm", "cpu", "fast")
    with pytest.raises(ValueError, match="unknown op 'softmax'"):
        backends.available("softmax", "cpu")


@pytest.mark.parametrize(
    "env, expected",
    [("", "cpu"), ("auto", "cpu"), ("reference", "reference"), ("layer_norm=reference", "reference"),
     ("attention=cpu, layer_norm = reference", "reference"), ("attention=reference", "cpu")],
)
def test_env_override(monkeypatch, env, expected):
    monkeypatch.setenv("FASTLLM_KERNELS", env)
    assert backends.select("layer_norm", "cpu") == expected
    assert backends.select("layer_norm", "cpu", "reference") == "reference"  # an explicit argument wins


def test_env_errors(monkeypatch):
    monkeypatch.setenv("FASTLLM_KERNELS", "layer_norm")
    with pytest.raises(ValueError, match="unknown backend 'layer_norm'"):
        backends.select("layer_norm", "cpu")
    monkeypatch.setenv("FASTLLM_KERNELS", "layer_norm=")
    with pytest.raises(ValueError, match="not of the form op=backend"):
        backends.select("layer_norm", "cpu")
    monkeypatch.setenv("FASTLLM_KERNELS", "cuda")
    with pytest.raises(backends.BackendUnavailable, match="'cuda' is unavailable on cpu"):
        backends.select("layer_norm", "cpu")


def test_choice_is_logged_once(caplog):
    with caplog.at_level("INFO", logger="fastllm"):
        backends.select("layer_norm", "cpu", "reference")
        backends.select("layer_norm", "cpu", "reference")
    assert sum("uses the reference backend" in r.message for r in caplog.records) == 1


def test_only_auto_reads_the_environment(monkeypatch):
    """Modules pass the backend they resolved at build time; select() must not read FASTLLM_KERNELS for it
    (ARCHITECTURE.md: no environment reads inside forward())."""
    class Spy(dict):
        def get(self, key, default=None):
            if key == "FASTLLM_KERNELS":
                raise LookupError("FASTLLM_KERNELS read")
            return super().get(key, default)

    monkeypatch.setattr(backends.os, "environ", Spy(backends.os.environ))
    assert backends.select("layer_norm", "cpu", "reference") == "reference"
    with pytest.raises(LookupError, match="FASTLLM_KERNELS read"):
        backends.select("layer_norm", "cpu", "auto")
