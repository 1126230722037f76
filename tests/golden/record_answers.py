"""Golden answers of a committed artifact, recorded by the pre-move main (b7ec53b) through HTTP."""
import json, sys, time, httpx, subprocess
from pathlib import Path
from serving.launch import free_port, serve_command, stop

art, out = Path(sys.argv[1]), Path(sys.argv[2])
port = free_port()
p = subprocess.Popen(serve_command({"compressed": str(art)}, port, "--split", "compressed=100"))
try:
    c = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    for _ in range(600):
        try:
            if c.get("/readyz").status_code == 200: break
        except httpx.HTTPError: pass
        time.sleep(0.1)
    genres = c.get("/v1/variants").json()["variants"][0]["genres"]
    requests = [{"user_id": str(u), "k": 10} for u in (1, 2, 5, 42, 196, 405, 655, 943)]
    requests += [{"user_id": "13", "k": 50, "exclude_seen": False},
                 {"user_id": "7", "k": 20, "exclude_genres": genres[:3]},
                 {"user_id": "99", "k": 10, "include_genres": genres[3:5]},
                 {"user_id": "new-1", "k": 10, "history": ["50", "172", "181", "1", "100"]},
                 {"user_id": "new-2", "k": 10, "history": ["258", "286"], "age": 30, "gender": "F",
                  "occupation": "writer", "zip_code": "94110"}]
    answers = []
    for r in requests:
        resp = c.post("/v1/recommend", json=r)
        resp.raise_for_status()
        body = resp.json()
        answers.append({"request": r, "items": [i["item_id"] for i in body["items"]],
                        "scores": [i["score"] for i in body["items"]], "fallback": body["fallback"],
                        "model_version": body["model_version"]})
    out.write_text(json.dumps(answers, indent=1) + "\n")
finally:
    stop(p)
