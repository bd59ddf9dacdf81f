"""The serving process's interpreter settings: each check runs in a fresh interpreter, as they are process-wide."""

import subprocess
import sys
import textwrap


def run(code: str) -> None:
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=60)


def test_serving_shortens_the_switch_interval_and_freezes_start_up_objects():
    run("""
        import gc, sys
        from indexer.interpreter import serve_from_this_process
        serve_from_this_process(0.25)
        assert sys.getswitchinterval() == 0.00025, sys.getswitchinterval()
        assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
    """)


def test_a_process_that_does_not_serve_keeps_the_defaults():
    run("""
        import gc, sys
        from indexer.interpreter import freeze_new_long_lived
        freeze_new_long_lived(something_was_released=True)
        assert gc.get_freeze_count() == 0 and sys.getswitchinterval() == 0.005
    """)


def test_a_closed_generations_frozen_cycles_are_collected_and_new_objects_frozen():
    run("""
        import gc, weakref
        from indexer.interpreter import freeze_new_long_lived, serve_from_this_process

        class Model:
            pass

        old = Model(); old.me = old  # a cycle: its refcount never reaches zero
        serve_from_this_process(0.5)
        gone = weakref.ref(old)
        del old
        gc.collect()
        assert gone() is not None  # frozen: a collection does not look at it

        new = Model()
        freeze_new_long_lived(something_was_released=True)
        assert gone() is None
        assert any(o is new for o in gc.get_objects()) is False  # tracked objects exclude the frozen
    """)
