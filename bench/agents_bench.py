"""What `cbt-llm synth api --agents` costs in requests: requests per record at api.agents.max_rounds K = 1..3.

    python bench/agents_bench.py                         # 200 questions, threshold 15, K = 1, 2, 3
    python bench/agents_bench.py --questions 500 --threshold 16

Not a quality claim: the endpoint is a local stub (bench/ may not import the tests' fake server). It drafts a
fixed five-part answer and adds one revision sentence per revision; as critic it scores every cbt criterion
min(highest, 1 + start + revisions), where start (0, 1 or 2, from a hash of the question) stands for drafts of
mixed quality, so the totals run 6 -> 11 -> 15 -> 18 from a third of the questions' first drafts, 11 -> 15 -> 18
and 15 -> 18 from the others'. Only counts are reported: on a stub, time measures this machine, not an endpoint
(a record's rounds are sequential, so its wall time is about 2 x rounds x the endpoint's latency). Prints a
markdown table and writes bench/results/agents.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cbt_llm.core.config import AgentsConfig, ApiSynthConfig
from cbt_llm.domain.rubrics import RUBRICS, RubricCritic
from data_pipeline.synth.agents import run_synth_api_agents

ROOT = Path(__file__).resolve().parent.parent
REVISED = "另外,每天固定一个时间写一次思维记录。"
PARTS = {
    "empathy": "听起来你最近承受了很多压力,这种感受是可以理解的。",
    "key_thought": "你心里可能有一个想法:只要出一点错,就说明自己不行。",
    "challenge": "有哪些事实支持这个想法,又有哪些事实并不支持它?",
    "strategy": "可以试着把自动出现的想法和情绪写下来,再写一个更平衡的想法。",
    "encouragement": "改变需要时间,你已经迈出了第一步;如果困扰持续,可以寻求专业心理咨询师的帮助。",
}


def _reply(messages: list[dict]) -> str:
    user = next(m["content"] for m in messages if m["role"] == "user")
    if RUBRICS["cbt"].answer_label in user:
        question, answer = user.split(RUBRICS["cbt"].answer_label, 1)
        start = hashlib.sha256(question.encode()).digest()[0] % 3
        revisions = answer.count(REVISED)
        scores = {k: min(hi, lo + 1 + start + revisions) for k, lo, hi, _ in RUBRICS["cbt"].criteria}
        return json.dumps(scores)
    drafts = [m["content"] for m in messages if m["role"] == "assistant"]
    revisions = drafts[-1].count(REVISED) + 1 if drafts else 0
    return json.dumps({**PARTS, "strategy": PARTS["strategy"] + REVISED * revisions}, ensure_ascii=False)


def stub_server() -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            message = {"role": "assistant", "content": _reply(body["messages"])}
            usage = {"prompt_tokens": 0, "completion_tokens": 0}
            data = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        request_queue_size = 256  # the stdlib's 5 would refuse a burst of connections as no real endpoint does
        daemon_threads = True

    srv = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def run_one(srv, tmp: Path, args, max_rounds: int) -> dict:
    cfg = ApiSynthConfig(
        input=str(tmp / "q.jsonl"),
        out_dir=str(tmp / f"k{max_rounds}"),
        base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1",
        model="stub",
        concurrency=args.concurrency,
        agents=AgentsConfig(enabled=True, threshold=args.threshold, max_rounds=max_rounds),
    )
    summary = run_synth_api_agents(cfg, RubricCritic(RUBRICS["cbt"]))
    ag = summary["agents"]
    return {
        "max_rounds": max_rounds,
        "records": summary["ok"],
        "requests": summary["requests"],
        "requests_per_record": ag["requests_per_record"],
        "stopped": ag["stopped"],
        "rounds": ag["rounds"],
        "mean_first_total": ag["mean_first_total"],
        "mean_final_total": ag["mean_final_total"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--threshold", type=float, default=15.0)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    srv = stub_server()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines = [
            json.dumps(
                {"id": f"b{i:05d}", "question": f"第{i}号问题:我最近总是很焦虑,晚上睡不着。"}, ensure_ascii=False
            )
            for i in range(args.questions)
        ]
        (tmp / "q.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for k in (1, 2, 3):
            rows.append(run_one(srv, tmp, args, k))
    srv.shutdown()
    print(f"\nthreshold {args.threshold:g}, {args.questions} questions\n")
    print(
        "| K | records | requests/record | reached threshold | stopped at K | rounds (n: records) "
        "| mean total, first -> kept |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        rounds = ", ".join(f"{k}: {v}" for k, v in r["rounds"].items())
        print(
            f"| {r['max_rounds']} | {r['records']} | {r['requests_per_record']:.2f} | {r['stopped']['threshold']} | "
            f"{r['stopped']['max_rounds']} | {rounds} | {r['mean_first_total']:.2f} -> {r['mean_final_total']:.2f} |"
        )
    out = ROOT / "bench" / "results" / "agents.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
