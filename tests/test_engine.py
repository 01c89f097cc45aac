"""Where tasks run: a task started for a driver ends as soon as that driver's process is gone."""
import json
import subprocess
import sys
import time

from benchmark.engine import InProcess


def test_a_task_ends_when_its_driver_is_killed():
    driver = subprocess.Popen([sys.executable, "-c", "import json, time; "
                               "from benchmark.tracking import process_tags; "
                               "print(json.dumps(process_tags()), flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    tags = json.loads(driver.stdout.readline())
    task = subprocess.Popen([sys.executable, "-c", "import json, sys, time; "
                             "from benchmark.engine import die_with; "
                             f"die_with(json.loads({json.dumps(json.dumps(tags))}), 0.2); "
                             "print('started', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert task.stdout.readline().strip() == "started"
    time.sleep(0.5)
    assert task.poll() is None  # the driver lives: so does the task
    driver.kill()
    driver.wait()
    started = time.monotonic()
    assert task.wait(timeout=10) == 70
    assert time.monotonic() - started < 5


def test_in_process_tasks_run_in_order_when_waited_for():
    engine = InProcess()
    first, second = engine.submit(pow, 2, 3), engine.submit(pow, 3, 2)
    assert engine.wait([first, second], timeout=0) == [(first, 8)]
    assert engine.wait([second], timeout=0) == [(second, 9)]
    assert engine.wait([], timeout=0) == []
