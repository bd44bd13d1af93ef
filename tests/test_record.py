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
