"""prunebench benchmarks: tasks, runner, metrics, leaderboard."""
