"""Placement rules (pure logic)."""

from __future__ import annotations

import pytest

from dfm_prefect.core.errors import PlacementError
from dfm_prefect.core.refs import DataRef
from dfm_prefect.core.wire import ExportInfo, OperationInfo, SiteInfo, SiteLoad, SiteRule, SourceInfo
from dfm_prefect.placement import owners, place


def site(name: str, ops: list[str], sources: dict[str, str] | None = None) -> SiteInfo:
    return SiteInfo(
        name=name,
        operations={op: OperationInfo(name=op, version="1", result_kind="value") for op in ops},
        sources=[SourceInfo(name=n, url=u, format="zarr") for n, u in (sources or {}).items()],
        export=ExportInfo(kinds=["value"], max_bytes=0, inline_bytes=0, share_logs=True),
        load=SiteLoad(),
    )


SITES = {
    "a": site("a", ["x.op", "y.op"], {"t": "s3://bucket/a/t.zarr"}),
    "b": site("b", ["x.op"], {"t": "file:///data/b/t.zarr", "replica": "file:///data/b/r.zarr"}),
    "c": site("c", ["x.op", "z.op"], {"replica": "file:///data/c/r.zarr"}),
}


def ref(at: str) -> DataRef:
    return DataRef(site=at, uri=f"file:///store/{at}/r.json", kind="value", format="json", size=1, sha256="0" * 64, op="x.op")


def test_explicit_site_wins_over_data_and_its_inputs_move_there():
    placement = place("x.op", data=[ref("a")], sites=SITES, explicit="b")
    assert placement.site == "b" and placement.moves == (ref("a"),)
    assert "inputs from a move there (1 bytes)" in placement.reason


def test_explicit_site_must_offer_the_operation():
    with pytest.raises(PlacementError, match="'b' does not offer 'z.op'"):
        place("z.op", data=[], sites=SITES, explicit="b")


def test_unknown_explicit_site_lists_candidates():
    with pytest.raises(PlacementError, match="not in the federation.*a \\(offers x.op\\)"):
        place("x.op", data=[], sites=SITES, explicit="nowhere")


def test_dataref_inputs_pin_the_site():
    placement = place("x.op", data=[[ref("c"), ref("c")]], sites=SITES)
    assert placement.site == "c" and "DataRef" in placement.reason


def test_refs_from_two_sites_need_sites_whose_policies_allow_the_moves():
    with pytest.raises(PlacementError, match=r"takes inputs held by a, b, and no site it could run at may receive its inputs: "
                       r"a: b does not send value results of 1 bytes to a \(its export.sites\)"):
        place("x.op", data=[ref("a"), ref("b")], sites=SITES)


def mesh(rules: dict[str, tuple[dict[str, list[str]], dict[str, list[str]]]]) -> dict[str, SiteInfo]:
    """Sites whose export.sites / imports allow value results as ``rules`` says: site -> (sends to, accepts from)."""
    out = {}
    for name, info in SITES.items():
        sends, accepts = rules.get(name, ({}, {}))
        export = info.export.model_copy(update={
            "sites": {to: SiteRule(kinds=kinds, max_bytes=1 << 30) for to, kinds in sends.items()},
            "imports": {frm: SiteRule(kinds=kinds, max_bytes=1 << 30) for frm, kinds in accepts.items()},
        })
        out[name] = info.model_copy(update={"export": export})
    return out


def sized(at: str, size: int) -> DataRef:
    return ref(at).model_copy(update={"size": size, "uri": f"file:///store/{at}/{size}.json"})


def test_the_site_that_moves_fewest_bytes_is_chosen_and_the_reason_says_so():
    sites = mesh({
        "a": ({"b": ["value"], "c": ["value"]}, {"b": ["value"]}),
        "b": ({"a": ["value"], "c": ["value"]}, {"a": ["value"]}),
        "c": ({}, {"a": ["value"], "b": ["value"]}),
    })
    big, small = sized("a", 1000), sized("b", 10)
    placement = place("x.op", data=[big, small], sites=sites)
    assert placement.site == "a" and placement.moves == (small,)
    assert placement.reason == (
        "takes inputs held by a, b: a moves the fewest bytes (a: moves 10 bytes; b: moves 1,000 bytes; c: moves 1,010 bytes)"
    )
    # A declared link cost can outweigh bytes: b -> a is slow, so the big input goes to b instead.
    assert place("x.op", data=[big, small], sites=sites, links={"b->a": 1000.0}).site == "b"


def test_a_site_whose_policy_refuses_a_move_is_not_chosen():
    sites = mesh({"a": ({"c": ["value"]}, {}), "b": ({"c": ["value"]}, {}), "c": ({}, {"a": ["value"], "b": ["value"]})})
    placement = place("x.op", data=[sized("a", 1000), sized("b", 10)], sites=sites)
    assert placement.site == "c" and "a: b does not send" in placement.reason


def test_inputs_go_to_a_site_that_offers_the_operation():
    sites = mesh({"b": ({"c": ["value"]}, {}), "c": ({}, {"b": ["value"]})})
    placement = place("z.op", data=[sized("b", 5)], sites=sites)
    assert placement.site == "c" and "held by b, which does not offer it" in placement.reason


def test_dataset_url_prefix_owns_the_data():
    assert place("x.op", data=["s3://bucket/a/t.zarr"], sites=SITES).site == "a"
    assert place("x.op", data=["file:///data/b/t.zarr/temperature"], sites=SITES).site == "b"
    assert place("x.op", data=["dfm://c/replica"], sites=SITES).site == "c"


def test_url_prefix_must_match_whole_segments():
    assert owners("s3://bucket/a/t.zarr2", SITES) == set()


def test_replicated_source_goes_to_the_least_loaded_site():
    assert place("x.op", data=["replica"], sites=SITES, inflight={"b": 5, "c": 1}).site == "c"
    assert place("x.op", data=["replica"], sites=SITES, inflight={"b": 0, "c": 1}).site == "b"


def test_failed_site_is_avoided_when_another_can_serve():
    assert place("x.op", data=["replica"], sites=SITES, exclude={"b"}).site == "c"


def test_sole_provider():
    assert place("y.op", data=[], sites=SITES).site == "a"


def test_no_provider_names_the_sites():
    with pytest.raises(PlacementError, match="no site offers 'w.op'"):
        place("w.op", data=[], sites=SITES)


def test_data_owner_without_the_operation_is_an_error():
    with pytest.raises(PlacementError, match="none of those offers 'z.op'"):
        place("z.op", data=["s3://bucket/a/t.zarr"], sites=SITES)


def test_unowned_data_is_an_error():
    with pytest.raises(PlacementError, match="no site in the federation holds data"):
        place("x.op", data=["s3://elsewhere/x.zarr"], sites=SITES)
