"""The Vast.ai provider against the fake API, through the real vastai SDK."""

from __future__ import annotations

import re

import pytest

from abfleet.errors import AbfleetError, ProviderError
from abfleet.fleet.ledger import Ledger
from abfleet.fleet.providers.base import FAILED, PENDING, RUNNING, CreateSpec, Requirements
from abfleet.fleet.providers.vast import VastProvider
from abfleet.fleet.rent import Rental, create_and_wait
from abfleet.settings import settings
from fakevast import API_KEY


@pytest.fixture
def vast(fake_vast):
    return VastProvider(settings().vast, backoff=0.01)


def req(**kw):
    base = dict(gpu_name="RTX_3090", gpu_count=1, gpu_memory_gb=22.8, disk_gb=30)
    return Requirements(**{**base, **kw})


def spec(label="abfleet:test"):
    return CreateSpec(
        label=label,
        image="pytorch/pytorch:latest",
        disk_gb=30,
        onstart="echo hi",
        env={"ABFLEET_RUN": "t"},
    )


def test_offers_are_cheapest_first_in_the_units_vast_wants(vast, fake_vast):
    offers = vast.offers(req())
    assert [o.id for o in offers] == ["101", "102"]  # 106 is cheaper but not verified
    assert offers[0].gpu_memory_gb == 24.0
    sent = fake_vast.calls("POST", "/api/v0/bundles/")[-1]
    # Priced with the 30 GB disk that will be rented, not the SDK's default 5 GB.
    assert sent["allocated_storage"] == 30
    assert offers[0].price_per_hour == pytest.approx(
        fake_vast.price(fake_vast.offers[0], 30), abs=1e-6
    )
    assert offers[0].price_per_hour > fake_vast.offers[0]["dph_total"]
    assert sent["gpu_ram"] == {"gte": 22800.0}  # GB in the query, MB on the wire (the SDK's job)
    assert sent["disk_space"] == {"gte": "30"} and sent["order"] == [["dph_total", "asc"]]
    assert sent["cpu_ram"] == {"gte": 0.0}
    assert sent["verified"] == {"eq": True}


def test_no_offers_names_the_filter_that_emptied_the_list(vast):
    with pytest.raises(ProviderError, match=r"none once disk_space>=900 is added"):
        vast.offers(req(disk_gb=900))
    with pytest.raises(ProviderError, match=r"none once dph_total<=0.1 is added"):
        vast.offers(req(max_price=0.1))
    # Host RAM (the fake's boxes have 128 GB): GB in the query, MB on the wire.
    with pytest.raises(ProviderError, match=r"none once cpu_ram>=200 is added"):
        vast.offers(req(host_ram_gb=200))
    assert vast.offers(req(host_ram_gb=100))
    with pytest.raises(ProviderError, match=r"no Vast\.ai offers at all"):
        vast.offers(req(gpu_count=8))


def test_wrong_key_is_named_as_such(fake_vast):
    provider = VastProvider(settings().vast, api_key="not-the-key", backoff=0.01)
    with pytest.raises(ProviderError, match=r"Vast\.ai rejected the API key"):
        provider.list()


def test_rate_limits_and_server_errors_are_retried(vast, fake_vast):
    fake_vast.inject("POST", "/api/v0/bundles/", 429, times=2, headers={"Retry-After": "0"})
    fake_vast.inject("GET", "/api/v1/instances/", 503, times=2)
    fake_vast.inject("GET", "/api/v1/instances/", 500, times=1)
    assert vast.offers(req())
    assert vast.list() == []
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) == 4


def test_persistent_server_errors_fail_loudly(vast, fake_vast):
    fake_vast.inject("GET", "/api/v1/instances/", 502, times=99)
    with pytest.raises(ProviderError, match="kept answering 502"):
        vast.list()


def test_gone_endpoint_and_unexpected_shapes_are_errors_never_empty_lists(vast, fake_vast):
    fake_vast.inject(
        "GET", "/api/v1/instances/", 410, {"success": False, "error": "deprecated_endpoint"}
    )
    with pytest.raises(ProviderError, match="410 Gone"):
        vast.list()
    fake_vast.inject("POST", "/api/v0/bundles/", 200, {"bundles": []})
    with pytest.raises(ProviderError, match="unexpected shape"):
        vast.offers(req())
    fake_vast.inject("GET", "/api/v1/instances/", 200, {"instances": [{"id": 1, "label": "x"}]})
    with pytest.raises(ProviderError, match="unexpected shape"):
        vast.list()


def test_create_sends_label_disk_onstart_and_ssh_runtype(vast, fake_vast):
    offer = vast.offers(req())[0]
    inst = vast.create(offer, spec())
    body = fake_vast.calls("PUT", r"/api/v0/asks/101/")[-1]
    assert body["label"] == "abfleet:test" and body["disk"] == 30 and body["onstart"] == "echo hi"
    assert body["runtype"] == "ssh_direc ssh_proxy" and body["image"] == "pytorch/pytorch:latest"
    assert API_KEY not in str(body)
    assert inst.state == PENDING and inst.label == "abfleet:test"


def test_a_lost_create_answer_finds_the_instance_instead_of_renting_twice(vast, fake_vast):
    offer = vast.offers(req())[0]
    fake_vast.inject("PUT", r"/api/v0/asks/\d+/", 502, after=True)
    inst = vast.create(offer, spec("abfleet:lost-answer"))
    assert inst.label == "abfleet:lost-answer"
    assert len(fake_vast.instances) == 1 and len(fake_vast.calls("PUT", r"/api/v0/asks/")) == 1


def test_instance_states_progress_and_list_pages_through_everything(vast, fake_vast):
    fake_vast.box_factory = None  # no SSH needed here
    fake_vast.offers = [
        dict(o, id=1000 + i, machine_id=9000 + i) for i, o in enumerate(fake_vast.offers[:1] * 30)
    ]
    created = [vast.create(vast.offers(req())[0], spec(f"abfleet:n{i}")) for i in range(30)]
    listed = vast.list()
    assert {i.id for i in listed} == {c.id for c in created} and len(listed) == 30
    assert len(fake_vast.calls("GET", "/api/v1/instances/")) >= 2  # 25 a page
    import time

    time.sleep(1.0)
    assert vast.get(created[0].id).state == RUNNING


def test_destroying_a_missing_instance_counts_as_done(vast, fake_vast):
    fake_vast.box_factory = None
    inst = vast.create(vast.offers(req())[0], spec())
    assert vast.destroy(inst.id) is True
    assert vast.destroy(inst.id) is False
    assert vast.get(inst.id) is None


def test_boot_failure_is_destroyed_and_replaced_once_on_another_machine(vast, fake_vast):
    fake_vast.boot_failures = 1
    fake_vast.offers[1]["dph_base"] = fake_vast.offers[0]["dph_base"]  # same price as agreed
    ledger = Ledger()
    plan_like = type("P", (), {"hours_for": lambda self, n: 1.0})()
    messages = []
    inst, remote = create_and_wait(
        vast,
        ledger,
        plan_like,
        req(),
        "boot-retry",
        1,
        True,
        None,
        messages.append,
        Rental(vast, ledger),
    )
    remote.close()
    failed_first = [b for b in fake_vast.calls("PUT", r"/api/v0/asks/")]
    assert len(failed_first) == 2  # one replacement, no more
    assert any("failed to boot" in m for m in messages)
    assert len(fake_vast.instances) == 1 and int(inst.id) in fake_vast.instances
    second_search = fake_vast.calls("POST", "/api/v0/bundles/")[-1]
    assert second_search["machine_id"] == {"notin": ["10101"]}
    states = {r.instance_id: r.state for r in ledger.instances(include_destroyed=True)}
    assert sorted(states.values()) == ["active", "destroyed"]
    assert FAILED not in {i.state for i in vast.list()}


def _dearer_launch(vast, fake_vast, confirm):
    """The first machine (confirmed) fails to boot; the next one costs more."""
    fake_vast.boot_failures = 1
    ledger = Ledger()
    plan_like = type("P", (), {"hours_for": lambda self, n: 1.0})()
    rental = Rental(vast, ledger)
    with rental:
        inst, remote = create_and_wait(
            vast, ledger, plan_like, req(), "dearer", 1, True, confirm, lambda m: None, rental
        )
    remote.close()
    return inst


def _rise(fake_vast) -> str:
    first, second = (fake_vast.price(o, 30) for o in fake_vast.offers[:2])
    return re.escape(f"{second:.3f} $/h instead of the {first:.3f} $/h you confirmed")


def test_a_dearer_replacement_is_not_rented_without_asking(vast, fake_vast):
    with pytest.raises(AbfleetError, match=_rise(fake_vast)):
        _dearer_launch(vast, fake_vast, confirm=None)
    assert fake_vast.instances == {}
    assert len(fake_vast.calls("PUT", r"/api/v0/asks/")) == 1


def test_a_dearer_replacement_is_rented_once_the_user_says_yes_again(vast, fake_vast):
    asked = []
    inst = _dearer_launch(vast, fake_vast, confirm=lambda q: asked.append(q) or True)
    assert any(re.search(_rise(fake_vast), q) for q in asked)
    assert list(fake_vast.instances) == [int(inst.id)]
