"""What each signal means, to each part that acts on it. The README's "Process
lifecycle" says the same for users.

A process (runtime/generations.py owns its signals once it runs; cli.py before):
TERM drains every generation (a second TERM stops them at once), INT and QUIT stop
them at once; HUP reloads (in a worker of --processes it is ignored: the arbiter
reloads every worker); USR1 logs the stack of every greenlet, at once and in any
phase; USR2 is logged and ignored (its default action would kill the process
without a drain). A stop at once exits 128 + the signal number (exits.killed_by).
"""

from __future__ import annotations

import signal

# The process, once its main loop runs.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNAL = signal.SIGHUP
STACKS_SIGNAL = signal.SIGUSR1
IGNORED_SIGNALS = (signal.SIGUSR2,)

# While the process starts (importing the consumer code can take a while), until the
# main loop or the arbiter installs its own: the stop signals end the start at once
# (nothing was consumed); SIGUSR1 logs where the start is; SIGHUP and SIGUSR2 are
# logged and ignored.
START_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                 signal.SIGUSR1, signal.SIGUSR2)

# A generation of consumers (runtime/generation.py), as the process passes signals on
# to the generations they concern: TERM drains (a second TERM stops at once); HUP,
# passed on to a generation a reload has replaced, drains too; INT and QUIT stop at once.
GRACEFUL_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
FAST_SIGNALS = (signal.SIGINT, signal.SIGQUIT)

# The arbiter of --processes (supervision/arbiter.py): the method of Arbiter its main
# loop calls for each.
ARBITER_SIGNALS: dict[int, str] = {
    signal.SIGTERM: "_on_term",        # every worker drains, then the arbiter exits; a
                                       # second SIGTERM stops them at once
    signal.SIGINT: "_on_fast_stop",    # every worker stops at once
    signal.SIGQUIT: "_on_fast_stop",
    signal.SIGHUP: "_on_hup",          # reload: a new set of workers, then the old set drains
    signal.SIGUSR1: "_on_usr1",        # passed on to the workers that handle it (those
                                       # that reported "started"): each logs its stacks
    signal.SIGUSR2: "_on_usr2",        # logged and ignored
}
