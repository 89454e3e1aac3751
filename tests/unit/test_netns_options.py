"""Test bed options: link rates and which options go together (no namespaces created)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gemini_ckpt.errors import ConfigError
from gemini_ckpt.testbed import netns
from gemini_ckpt.testbed.spec import LocalSpec


@pytest.mark.parametrize(
    ("text", "bits"),
    [("200mbit", 200_000_000), ("1gbit", 10**9), ("1.5GBIT", 1_500_000_000), ("64kbit", 64_000)],
)
def test_rates_use_tc_decimal_units(text, bits):
    assert netns.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["1gb", "fast", "mbit", "-1gbit", "1 gbit", "200mbps"])
def test_a_rate_without_a_bit_unit_is_refused_with_an_example(text):
    with pytest.raises(ConfigError, match=r"not a rate: .* e\.g\. 200mbit or 1gbit"):
        netns.parse_rate(text)


def test_a_rate_below_one_kbit_is_refused():
    with pytest.raises(ConfigError, match="below the 1kbit minimum"):
        netns.parse_rate("999bit")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((False, 2, "1gb", 0, ""), "not a rate"),
        ((True, 2, "", 1, ""), "does not support warm standbys"),
        ((True, 2, "", 0, "127.0.0.1:2379"), "unreachable there"),
        ((True, 254, "", 0, ""), r"1\.\.253 machines, got 254"),
        ((True, 2, "1gb", 0, ""), "not a rate"),
    ],
)
def test_options_that_cannot_work_together_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        netns.check_testbed_options(*options)


def test_loopback_and_shaped_options_that_fit_are_accepted():
    netns.check_testbed_options(False, 4, "", 2, "127.0.0.1:2379")
    netns.check_testbed_options(False, 4, "1gbit", 0, "")  # the cost model of --interleave
    netns.check_testbed_options(True, 4, "1gbit", 0, "")


def test_each_machine_gets_its_own_address_and_namespace_on_the_jobs_subnet():
    net = netns.ShapedNetwork(netns.NetworkSpec(3, "1gbit"))
    net.subnet = 77  # chosen by start(); set here to check the naming without creating anything
    assert [net.address(m) for m in range(3)] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    assert net.host_address == "10.77.0.254"
    assert net.exec_prefix(2) == ["ip", "netns", "exec", "gck77-m2"]
    assert net.switch == "gck77-sw"
    assert net.env() == {"GLOO_SOCKET_IFNAME": "veth0"}


def test_a_member_ttl_an_etcd_election_would_outlast_is_refused():
    script = Path(__file__)
    with pytest.raises(ConfigError, match=r"--member-ttl 2 s is too short .* use --member-ttl 4"):
        LocalSpec(2, 1, script, etcd_members=3, member_ttl_s=2)
    LocalSpec(2, 1, script, etcd_members=3, member_ttl_s=4)
    LocalSpec(2, 1, script, member_ttl_s=2)  # one member: no elections
    LocalSpec(2, 1, script, etcd="127.0.0.1:2379", member_ttl_s=2)  # its timings are not ours


@pytest.mark.parametrize(
    ("fault", "options", "message"),
    [
        ("kill-etcd-member@step=2,member=3", {"etcd_members": 3}, "names etcd member 3; .* runs 3"),
        ("stop-etcd@step=2", {"etcd": "127.0.0.1:2379"}, "needs the test bed's own etcd"),
    ],
)
def test_an_etcd_fault_the_test_bed_cannot_execute_is_refused(fault, options, message):
    with pytest.raises(ConfigError, match=message):
        LocalSpec(2, 1, Path(__file__), faults=(fault,), member_ttl_s=5, **options)
    LocalSpec(2, 1, Path(__file__), faults=("kill-etcd-member@step=2,member=leader",))
