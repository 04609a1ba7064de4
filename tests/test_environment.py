"""The environment report probes the real stack and says what follows."""

from __future__ import annotations

from lora_nb import environment


def test_report_lists_every_package_with_its_version():
    import torch

    checks = environment.check_environment(probe_hub=False)
    by_name = {c.name: c for c in checks}
    assert by_name["torch"].ok and by_name["torch"].detail.startswith(torch.__version__.split("+")[0])
    for name in environment.PACKAGES:
        assert by_name[name].ok, by_name[name]


def test_quantization_probes_really_quantize_here():
    checks = {c.name: c for c in environment.check_environment(probe_hub=False)}
    assert checks["4-bit (bitsandbytes)"].ok and "runs 4bit on cpu" in checks["4-bit (bitsandbytes)"].detail
    assert checks["8-bit (bitsandbytes)"].ok and "CPU backend" in checks["8-bit (bitsandbytes)"].advice


def test_no_gpu_is_explained_in_words(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check = environment._gpu_check()
    assert check.detail == "none" and "CPU" in check.advice


def test_missing_package_says_how_to_install():
    check = environment._package_check("surely-not-a-package-xyz")
    assert not check.ok and "pip install surely-not-a-package-xyz" in str(check)
    assert str(check).startswith("[FAIL]")


def test_report_ends_with_a_verdict():
    text = environment.report([environment.Check("a", True, "1"), environment.Check("b", False, "x", "fix b")])
    assert text.splitlines() == ["[OK]   a: 1", "[FAIL] b: x -> fix b", "Needs attention: b."]
