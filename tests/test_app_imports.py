"""The API never trains, down to its imports: serving requests (models, tasks, admin
listings, queueing a job) leaves the training stack unimported. Run in a fresh
interpreter, so modules other tests imported cannot hide a regression."""

import json
import subprocess
import sys

SERVE_AND_LIST_MODULES = """
import json, sys
from fastapi.testclient import TestClient
from app.main import create_app
from app.settings import Settings

settings = Settings(data_dir=sys.argv[1], default_pool=sys.argv[2], admin_token="t", database_url=None)
admin = {"Authorization": "Bearer t"}
with TestClient(create_app(settings)) as client:
    answers = [client.post("/models", json={"tasks": ["task0", "task1"]}).status_code,
               client.get("/tasks").status_code, client.get("/ready").status_code,
               client.get("/admin/pools", headers=admin).status_code,
               client.post("/admin/extractions", headers=admin, json={"data": {"source": "synthetic"}}).status_code]
print(json.dumps({"answers": answers, "modules": sorted(sys.modules)}))
"""


def test_serving_requests_imports_no_training(tmp_path, pool):
    out = subprocess.run([sys.executable, "-c", SERVE_AND_LIST_MODULES, str(tmp_path / "var"), str(pool.root)],
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["answers"] == [200, 200, 200, 200, 202]
    assert "app.main" in result["modules"]
    assert "poe_core.train" not in result["modules"]
    assert "app.jobs.extraction" not in result["modules"]
