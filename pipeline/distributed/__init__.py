"""Running the DVC pipeline's stages in parallel on Ray: every core and GPU of one machine, or a Ray cluster.

DVC runs stages one after another and cannot do otherwise (treeverse/dvc#755). Here DVC still decides everything
(the stage graph, what is stale, how a stage runs, what its results are) and Ray only places the work:

- `stages`: which stages must run, in an order DVC would accept, and each one's upstream stages;
- `snapshot`: the working tree as a git commit that workers check out, so uncommitted edits run too;
- `worker`: one stage in a fresh clone, `dvc repro --pull --single-item`, results pushed to the shared DVC remote;
- `runner`: the Ray coordinator (resources, retries, failures) and the final `dvc repro --pull` that restores
  every output from the run-cache and runs nothing.

    ./dev.sh repro --jobs 2                      # this machine, two stages at a time
    ./dev.sh repro --cluster HOST:6379 --remote s3://bucket/path   # a Ray cluster and a shared DVC remote
"""
