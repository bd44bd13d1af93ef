"""The typed record: results.jsonl lines read and written back unchanged, old and hand-edited ones tolerated."""

from __future__ import annotations

import orjson

from nanobatch.output.record import ErrorInfo, ItemRecord

# A two-step item's line as nanobatch wrote it before records were typed: every field, in its order.
OLD_LINE = (
    b'{"id":"hero","run":"abc123","status":"failed","outputs":[],"finish_reason":"IMAGE_SAFETY","text":"no",'
    b'"usage":{"promptTokenCount":10,"totalTokenCount":10},"steps":[{"step":1,"instruction":"logo",'
    b'"finish_reason":"STOP","text":null,"usage":{"promptTokenCount":5},"outputs":["hero.step1.png"]},'
    b'{"step":2,"instruction":"warmer"}],"attempts":3,"latency_s":4.25,"cost_usd":0.039,'
    b'"model":"gemini-3.1-flash-image","model_version":"v1","response_id":"r1","key":"k","error":{"kind":'
    b'"server_error","status_code":502,"message":"Bad Gateway","step":2},"instructions":["logo","warmer"],'
    b'"inputs":["a.png"],"aspect_ratio":null,"image_size":"1K","tier":"standard","fallback":false,'
    b'"started_at":"2026-11-25T10:00:00Z","finished_at":"2026-11-25T10:00:04Z","input_stamps":[[3,17,"ab"]],'
    b'"finish_message":"withheld"}'
)


def test_an_old_line_is_read_and_written_back_byte_for_byte() -> None:
    record = ItemRecord.from_json(orjson.loads(OLD_LINE))
    assert record.error == ErrorInfo(kind="server_error", status_code=502, message="Bad Gateway", step=2)
    assert record.files == ["hero.step1.png"] and record.tokens() == (10, 0, 0, 10)
    assert orjson.dumps(record.to_json()) == OLD_LINE


def test_a_sparse_or_hand_edited_line_takes_defaults_and_keeps_fields_it_does_not_know() -> None:
    record = ItemRecord.from_json({"id": 7, "status": "ok", "attempts": "two", "note": "checked by hand"})
    assert (record.id, record.attempts, record.cost_usd, record.outputs, record.error) == ("7", None, None, (), None)
    assert record.to_json()["note"] == "checked by hand"


def test_a_runs_latency_percentiles_are_the_sorted_ones_without_a_sorted_copy() -> None:
    """summary.json's p50 and p95 of a run's latencies: the nearest-rank values a sorted list gives, found with a
    small fraction of the memory (a sorted copy of a million latencies is 32 MB at the run's end)."""
    import random
    import tracemalloc
    from array import array

    from nanobatch.percentiles import percentile, unsorted_percentile

    rng = random.Random(7)
    shapes = {
        "spread": lambda n: [rng.random() * 300 for _ in range(n)],
        "log-normal, to the millisecond": lambda n: [round(rng.lognormvariate(0, 1), 3) for _ in range(n)],
        "all alike but a few": lambda n: [0.2] * n + [300.0] * (n // 50),
        "three values": lambda n: [rng.choice([0.1, 0.2, 0.3]) for _ in range(n)],
    }
    for shape, make in shapes.items():
        for n in (1, 2, 3, 100, 20_000):
            values = array("d", make(n))
            for q in (0.01, 0.5, 0.95, 1.0):
                assert unsorted_percentile(values, q) == percentile(sorted(values), q), (shape, n, q)
    values = array("d", (rng.lognormvariate(2, 1) for _ in range(100_000)))
    tracemalloc.start()
    try:
        unsorted_percentile(values, 0.5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 400_000  # a sorted copy: 3.2 MB
