"""`slimrec serve --workers 2`: one service, not two. /metrics from either worker counts every
worker's requests (prometheus_client multiprocess mode), and a split changed through one worker
is in force on both (they follow the stored split)."""

from __future__ import annotations

import time

from serving_fixtures import ADMIN_TOKEN, metric_value, running_server

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REQUESTS = 120


def test_two_workers_count_and_route_as_one_server(tiny_teacher, tmp_path):
    variants = {"full": tiny_teacher, "compressed": tiny_teacher}
    env = {"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN, "SLIMREC_STATE_REFRESH_S": "0.2"}
    with running_server(tmp_path, variants, "--workers", "2", env=env) as server:
        pids = set()
        for n in range(REQUESTS):  # new connections: uvicorn's workers share the listening socket
            response = server.client.post(
                "/v1/recommend", json={"user_id": str(1 + n)}, headers={"Connection": "close"}
            )
            assert response.status_code == 200, response.text
            pids.add(response.json()["request_id"].split("-")[0])
        assert len(pids) == 2, "every request went to one worker: the test shows nothing"
        for _ in range(3):  # whichever worker answers the scrape sums both
            text = server.client.get("/metrics", headers={"Connection": "close"}).text
            total = sum(
                metric_value(text, "slimrec_requests_total", variant=v, endpoint="recommend", status="200")
                or 0
                for v in variants
            )
            assert total == REQUESTS
        response = server.client.put("/admin/split", json={"weights": {"compressed": 1}}, headers=AUTH)
        assert response.status_code == 200, response.text
        time.sleep(1.0)  # five refresh periods
        routed = {
            server.client.post(
                "/v1/recommend", json={"user_id": str(u)}, headers={"Connection": "close"}
            ).json()["variant"]
            for u in range(1, 60)
        }
        assert routed == {"compressed"}
