"""models/stage_times.py: rows accumulate per stage, merge under a prefix and sum by part."""

from __future__ import annotations

from slimrec.models.stage_times import StageTimes


def test_rows_accumulate_merge_and_sum_by_part():
    times = StageTimes()
    times.add("load_data", 1.0, 0.5)
    times.add("load_data", 2.0, 1.0)  # a stage run twice adds up
    times.merge("train retrieval", {"data": {"wall_s": 3.0, "cpu_s": 2.0, "peak_rss_mib": 10.0}})
    times.merge("train ranker", {"data": {"wall_s": 4.0, "cpu_s": 3.0, "peak_rss_mib": 30.0}})
    rows = times.to_dict()
    assert list(rows) == ["load_data", "train retrieval/data", "train ranker/data"]
    assert rows["load_data"]["wall_s"] == 3.0 and rows["load_data"]["cpu_s"] == 1.5
    # by part: data = 3 + 4 s wall, 2 + 3 s CPU, peak the larger of 10 and 30 MiB
    assert times.by_part()["data"] == {"wall_s": 7.0, "cpu_s": 5.0, "peak_rss_mib": 30.0}
    assert "total data" in times.summary()


def test_stage_context_counts_even_when_the_stage_raises():
    times = StageTimes()
    try:
        with times.stage("export"):
            raise RuntimeError("disk full")
    except RuntimeError:
        pass
    assert times.to_dict()["export"]["wall_s"] >= 0.0
    assert times.to_dict()["export"]["peak_rss_mib"] > 0
