"""The plugin's settings: env parsing, CLI flags, CLI-over-env precedence, bad values."""

import argparse
import dataclasses
import re

import pytest

from moe_dispatch.sglang_plugin.settings import (
    CLI_DESTS,
    DEFAULT_BATCH_THRESHOLD,
    ENV_VARS,
    POLICIES,
    AdaptiveMoESettings,
    add_cli_args,
    from_cli_namespace,
    from_env,
    parse_bool,
)

ENABLED = ENV_VARS["enabled"]
THRESHOLD = ENV_VARS["batch_threshold"]
POLICY = ENV_VARS["policy"]
PLAN = ENV_VARS["plan_path"]


def parse(argv, environ=None):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    return from_cli_namespace(parser.parse_args(argv), environ or {})


# --- the record ------------------------------------------------------------------------


def test_defaults_are_off():
    s = AdaptiveMoESettings()
    assert (s.enabled, s.batch_threshold, s.policy, s.plan_path) == (False, 1536, "measure", None)
    assert DEFAULT_BATCH_THRESHOLD == 1536
    assert POLICIES == ("measure", "threshold", "fixed")


def test_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AdaptiveMoESettings().enabled = True


def test_env_var_names_cover_every_field():
    fields = {f.name for f in dataclasses.fields(AdaptiveMoESettings)}
    assert set(ENV_VARS) == fields == set(CLI_DESTS)
    assert dict(ENV_VARS) == {
        "enabled": "SGLANG_ADAPTIVE_MOE",
        "batch_threshold": "SGLANG_ADAPTIVE_MOE_BATCH_THRESHOLD",
        "policy": "SGLANG_ADAPTIVE_MOE_POLICY",
        "plan_path": "SGLANG_ADAPTIVE_MOE_PLAN",
        "kernel": "SGLANG_ADAPTIVE_MOE_KERNEL",
        "extra_kernels": "SGLANG_ADAPTIVE_MOE_EXTRA_KERNELS",
    }


@pytest.mark.parametrize("threshold", [0, -1, 1.5, "1536", True, None])
def test_constructor_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match=re.escape(repr(threshold))):
        AdaptiveMoESettings(batch_threshold=threshold)


@pytest.mark.parametrize("policy", ["fastest", "", "Measure", None])
def test_constructor_rejects_bad_policy(policy):
    with pytest.raises(ValueError, match="policy must be one of"):
        AdaptiveMoESettings(policy=policy)


def test_fixed_policy_needs_a_known_kernel_and_only_it_takes_one():
    assert AdaptiveMoESettings(policy="fixed", kernel="triton").kernel == "triton"
    with pytest.raises(ValueError, match="policy 'fixed' needs kernel"):
        AdaptiveMoESettings(policy="fixed")
    with pytest.raises(ValueError, match="policy 'fixed' needs kernel"):
        AdaptiveMoESettings(policy="fixed", kernel="cutlass")
    with pytest.raises(ValueError, match="only used with policy 'fixed'"):
        AdaptiveMoESettings(policy="measure", kernel="triton")


def test_fixed_kernel_travels_through_env_and_cli():
    settings = AdaptiveMoESettings(enabled=True, policy="fixed", kernel="triton_kernels")
    assert from_env(settings.to_env()) == settings
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args(["--adaptive-moe-policy", "fixed", "--adaptive-moe-kernel", "triton"])
    assert from_cli_namespace(ns, {}).kernel == "triton"
    with pytest.raises(ValueError, match="SGLANG_ADAPTIVE_MOE_KERNEL must be one of"):
        from_env({"SGLANG_ADAPTIVE_MOE_KERNEL": "cutlass"})


@pytest.mark.parametrize("plan", ["", "   ", 3])
def test_constructor_rejects_bad_plan(plan):
    with pytest.raises(ValueError, match="plan_path"):
        AdaptiveMoESettings(plan_path=plan)


def test_constructor_rejects_non_bool_enabled():
    with pytest.raises(TypeError, match="enabled"):
        AdaptiveMoESettings(enabled="yes")


def test_threshold_one_is_valid():
    assert AdaptiveMoESettings(batch_threshold=1).batch_threshold == 1


# --- environment -----------------------------------------------------------------------


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "TRUE", " On ", "Yes"])
def test_env_true_words(word):
    assert from_env({ENABLED: word}).enabled is True
    assert parse_bool(word) is True


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "FALSE", " Off "])
def test_env_false_words(word):
    assert from_env({ENABLED: word}).enabled is False


@pytest.mark.parametrize("word", ["2", "y", "enable", "truee", "-1"])
def test_env_bad_bool_names_var_and_value(word):
    with pytest.raises(ValueError) as err:
        from_env({ENABLED: word})
    assert ENABLED in str(err.value) and repr(word) in str(err.value)


def test_env_empty_means_defaults():
    assert from_env({}) == AdaptiveMoESettings()
    blank = {ENABLED: "", THRESHOLD: " ", POLICY: "", PLAN: ""}
    assert from_env(blank) == AdaptiveMoESettings()


def test_env_all_fields():
    s = from_env({ENABLED: "1", THRESHOLD: " 512 ", POLICY: "Threshold", PLAN: "/tmp/plan.json"})
    assert s == AdaptiveMoESettings(True, 512, "threshold", "/tmp/plan.json")


def test_env_ignores_unrelated_vars():
    assert from_env({"SGLANG_ADAPTIVE_MOE_X": "junk", "PATH": "/bin"}) == AdaptiveMoESettings()


@pytest.mark.parametrize("value", ["0", "-8", "abc", "1.5", "1e3", "0x10"])
def test_env_bad_threshold_names_var_and_value(value):
    with pytest.raises(ValueError) as err:
        from_env({THRESHOLD: value})
    assert THRESHOLD in str(err.value) and repr(value) in str(err.value)


def test_env_bad_policy_names_var_and_value():
    with pytest.raises(ValueError) as err:
        from_env({POLICY: "fastest"})
    assert POLICY in str(err.value) and "'fastest'" in str(err.value)


@pytest.mark.parametrize(
    "settings",
    [
        AdaptiveMoESettings(),
        AdaptiveMoESettings(True, 7, "threshold", "plans/gpt-oss.json"),
        AdaptiveMoESettings(enabled=True, policy="measure"),
        AdaptiveMoESettings(enabled=True, policy="measure", extra_kernels=("small_batch", "triton_tuned")),
    ],
)
def test_to_env_round_trip(settings):
    env = settings.to_env()
    assert set(env) <= set(ENV_VARS.values())
    assert all(isinstance(v, str) for v in env.values())
    assert from_env(env) == settings


def test_to_env_omits_missing_plan():
    env = AdaptiveMoESettings(enabled=True).to_env()
    assert env == {ENABLED: "1", THRESHOLD: "1536", POLICY: "measure"}


# --- command line ----------------------------------------------------------------------


def test_cli_defaults_are_none():
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args([])
    assert all(getattr(ns, dest) is None for dest in CLI_DESTS.values())
    assert from_cli_namespace(ns, {}) == AdaptiveMoESettings()


def test_cli_all_flags():
    s = parse(
        [
            "--enable-adaptive-moe",
            "--adaptive-moe-batch-threshold",
            "2048",
            "--adaptive-moe-policy",
            "threshold",
            "--adaptive-moe-plan",
            "p.json",
        ]
    )
    assert s == AdaptiveMoESettings(True, 2048, "threshold", "p.json")


def test_cli_beats_env():
    env = {ENABLED: "0", THRESHOLD: "100", POLICY: "measure", PLAN: "env.json"}
    s = parse(
        ["--enable-adaptive-moe", "--adaptive-moe-batch-threshold", "200", "--adaptive-moe-plan", "cli.json"], env
    )
    assert s == AdaptiveMoESettings(True, 200, "measure", "cli.json")


def test_cli_can_switch_off_what_env_switched_on():
    assert parse(["--no-enable-adaptive-moe"], {ENABLED: "1"}).enabled is False


def test_env_fills_flags_not_given():
    s = parse(["--adaptive-moe-policy", "threshold"], {ENABLED: "yes", THRESHOLD: "64"})
    assert s == AdaptiveMoESettings(True, 64, "threshold", None)


def test_flags_do_not_enable_by_themselves():
    assert parse(["--adaptive-moe-batch-threshold", "8"]).enabled is False


def test_namespace_without_our_flags_uses_env():
    ns = argparse.Namespace(model_path="x")
    assert from_cli_namespace(ns, {ENABLED: "on"}) == AdaptiveMoESettings(enabled=True)


@pytest.mark.parametrize(
    "argv",
    [
        ["--adaptive-moe-batch-threshold", "0"],
        ["--adaptive-moe-batch-threshold", "abc"],
        ["--adaptive-moe-policy", "fastest"],
        ["--enable-adaptive-moe=1"],
    ],
)
def test_cli_rejects_bad_values(argv, capsys):
    with pytest.raises(SystemExit):
        parse(argv)
    assert "error" in capsys.readouterr().err


def test_cli_bad_threshold_message_names_flag(capsys):
    with pytest.raises(SystemExit):
        parse(["--adaptive-moe-batch-threshold", "-3"])
    err = capsys.readouterr().err
    assert "--adaptive-moe-batch-threshold" in err and "'-3'" in err


def test_bad_env_still_raises_when_cli_overrides_it():
    # The environment is parsed first; a broken variable is reported, not silently shadowed.
    with pytest.raises(ValueError, match=THRESHOLD):
        parse(["--adaptive-moe-batch-threshold", "10"], {THRESHOLD: "ten"})


def test_empty_cli_plan_is_rejected():
    with pytest.raises(ValueError, match="plan_path"):
        parse(["--adaptive-moe-plan", ""])


def test_help_mentions_env_vars(capsys):
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    out = capsys.readouterr().out
    for var in ENV_VARS.values():
        assert var in out


def test_extra_kernels_parse_from_env_and_cli_and_need_policy_measure():
    extra = ENV_VARS["extra_kernels"]
    parsed = from_env({ENABLED: "1", extra: " Triton_Tuned, small_batch,"})
    assert parsed.extra_kernels == ("triton_tuned", "small_batch")
    assert from_env({ENABLED: "1", extra: " "}).extra_kernels == ()
    with pytest.raises(ValueError, match=f"{extra} names unknown kernels \\['flashinfer'\\]"):
        from_env({extra: "flashinfer"})
    with pytest.raises(ValueError, match="need policy 'measure'"):
        AdaptiveMoESettings(enabled=True, policy="threshold", extra_kernels=("small_batch",))
    for bad in (["small_batch"], ("small_batch", "small_batch"), ("torch",)):
        with pytest.raises(ValueError, match="extra_kernels must be a tuple of distinct names"):
            AdaptiveMoESettings(extra_kernels=bad)
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    ns = parser.parse_args(["--adaptive-moe-extra-kernels", "small_batch"])
    assert from_cli_namespace(ns, {extra: "triton_tuned"}).extra_kernels == ("small_batch",)  # the flag wins
    assert from_cli_namespace(parser.parse_args([]), {extra: "triton_tuned"}).extra_kernels == ("triton_tuned",)
    with pytest.raises(SystemExit):
        parser.parse_args(["--adaptive-moe-extra-kernels", "fastest"])
