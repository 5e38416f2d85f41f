"""StepzipClient over several replicas, against real HTTP servers on loopback
(`replica_http.Replica`); tests/integration/test_replicas.py uses real stepzip servers."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from replica_http import Replica, compress_answer

from clients.client import NoReplicaLeft, StepzipClient, StepzipError, parse_urls
from stepzip.schemas import compress as schemas


@pytest.fixture
def replicas():
    made: list[Replica] = []

    def make(*args, **kw) -> Replica:
        made.append(Replica(*args, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def problems(n: int) -> tuple[list[str], list[str]]:
    return [f"problem {i}?" for i in range(n)], [f"p{i}" for i in range(n)]


def test_parse_urls_accepts_lists_and_comma_strings():
    assert parse_urls("http://a:1, http://b:2/") == ["http://a:1", "http://b:2"]
    assert parse_urls(["http://a:1", "http://b:2,http://c:3"]) == [
        "http://a:1", "http://b:2", "http://c:3"]
    for bad, reason in (("", "no server"), ("a:1", "http://"), ("http://a,http://a", "repeat")):
        with pytest.raises(ValueError, match=reason):
            parse_urls(bad)


def test_requests_go_to_the_replica_with_fewest_outstanding(replicas):
    hold = threading.Event()
    a, b = replicas(hold=hold), replicas(hold=hold)
    with StepzipClient([a.url, b.url], max_problems=64) as client, \
            ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client.compress, [f"q{i}"], ids=[f"p{i}"]) for i in range(4)]
        deadline = time.monotonic() + 10
        while a.problems_seen + b.problems_seen < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.outstanding for r in client.replicas] == [2, 2]
        hold.set()
        ids = [f.result().results[0].id for f in futures]
    assert ids == ["p0", "p1", "p2", "p3"]
    assert (a.problems_seen, b.problems_seen) == (2, 2)


def test_a_dead_replica_loses_nothing_and_duplicates_nothing(replicas):
    alive = replicas()
    texts, ids = problems(20)
    with StepzipClient([closed_port_url(), alive.url], max_problems=4) as client:
        out = client.compress(texts, ids=ids)
        dead = client.replicas[0]
        assert dead.failures >= 1 and dead.completed == 0
    assert [r.id for r in out.results] == ids  # every problem once, in order
    assert alive.problems_seen == 20


def test_work_of_a_replica_dying_mid_request_is_redone_elsewhere(replicas):
    dying, alive = replicas("reset"), replicas()
    texts, ids = problems(12)
    progress: list[tuple[int, int]] = []
    with StepzipClient([dying.url, alive.url], max_problems=3, retry_after=60) as client:
        out = client.compress(texts, ids=ids, progress=lambda d, t: progress.append((d, t)))
    assert [r.id for r in out.results] == ids
    assert dying.problems_seen >= 3  # it did receive work before it failed
    assert sorted(i for chunk in alive.seen for i in chunk) == sorted(ids)
    assert progress[-1] == (12, 12) and [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert out.usage.prompt_tokens == 12 and out.timings.generate_s == pytest.approx(2.0)


def test_503_is_a_replica_failure_but_422_is_the_requests(replicas):
    down, alive = replicas("503"), replicas()
    with StepzipClient([down.url, alive.url], max_problems=64) as client:
        assert client.compress(["q"], ids=["x"]).results[0].id == "x"
        assert client.replicas[0].down_until > 0  # set aside
    stopping, alive = replicas("500"), replicas()  # a replica shutting down answers 500
    with StepzipClient([stopping.url, alive.url], max_problems=64) as client:
        assert client.compress(["q"], ids=["y"]).results[0].id == "y"
        assert client.replicas[0].failures == 1 and client.replicas[0].down_until == 0
    bad, other = replicas("422"), replicas()
    with StepzipClient([bad.url, other.url], max_problems=64) as client, \
            pytest.raises(StepzipError) as info:
        client.compress(["q"])
    assert info.value.status == 422 and "problems.0.text: must not be blank" in str(info.value)
    assert other.seen == []  # not retried: every replica would refuse it


def test_every_replica_failing_raises_with_the_last_cause(replicas):
    with StepzipClient([closed_port_url(), closed_port_url()]) as client, \
            pytest.raises(NoReplicaLeft, match="every replica"):
        client.compress(["q"])
    with StepzipClient(closed_port_url()) as client:  # one server: its own error
        with pytest.raises(Exception) as info:
            client.compress(["q"])
        assert not isinstance(info.value, NoReplicaLeft)


def test_batches_follow_the_servers_limit_from_health(replicas):
    a, b = replicas(max_problems=5), replicas(max_problems=3)
    texts, ids = problems(10)
    with StepzipClient(f"{a.url},{b.url}") as client:
        out = client.compress(texts, ids=ids)
        assert client.problems_per_request() == 3
    assert [r.id for r in out.results] == ids
    assert max(len(chunk) for chunk in a.seen + b.seen) == 3
    assert a.seen and b.seen  # both replicas took chunks


def test_weight_loads_go_to_every_replica(replicas):
    a, b = replicas(), replicas()
    with StepzipClient([a.url, b.url]) as client:
        answer = client.load_weights("/tmp/ckpt", checksum=False)
        assert answer["version"] == "v1" and set(answer["replicas"]) == {a.url, b.url}
        assert client.weight_version() == "v1"
        b.loads += 1
        assert client.weight_version() == "v1,v2"


def test_merge_keeps_schema():
    parts = [schemas.CompressResponse.model_validate(compress_answer(
        {"problems": [{"text": "t", "id": str(i)}]})) for i in range(3)]
    from clients.client import merge_responses

    merged = merge_responses(parts)
    assert [r.id for r in merged.results] == ["0", "1", "2"]
    # Summed request time, every field alike: the caller measures its own wall time.
    assert merged.timings.total_s == pytest.approx(3.0)
    assert merged.timings.generate_s == pytest.approx(1.5)
