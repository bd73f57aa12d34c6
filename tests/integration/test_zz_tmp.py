import asyncio, importlib.util, pathlib
import pytest
from loom_infra import bus
spec = importlib.util.spec_from_file_location("st", pathlib.Path(__file__).parent / "test_step_types.py")
st = importlib.util.module_from_spec(spec); spec.loader.exec_module(st)

@pytest.fixture(autouse=True)
def nonblocking(monkeypatch):
    orig = bus.PullConsumer._dispatch
    tasks = set()
    async def dispatch(self, msgs):
        t = asyncio.ensure_future(orig(self, msgs)); tasks.add(t); t.add_done_callback(tasks.discard)
    monkeypatch.setattr(bus.PullConsumer, "_dispatch", dispatch)

async def test_it(client):
    await st.test_foreach_completions_interleave_but_output_keeps_input_order(client)
