"""Run the pipeline on a dask.distributed cluster: here a LocalCluster of two worker processes.

Any ``distributed.Client`` works the same way (``Client("tcp://scheduler:8786")``, or a dask-jobqueue
``SLURMCluster``, see docs/cluster.md): the plugin submits one task per slice to it and never starts or stops
the cluster itself. The result is identical, byte for byte, to a run on one thread.

Run: ``python examples/run_on_local_cluster.py OUT_DIR``
"""

import sys
from pathlib import Path

from distributed import Client, LocalCluster

from napari_soct import RunParams, run_pipeline
from napari_soct.processing.synthetic import make_acquisition

if __name__ == "__main__":  # worker processes import this file: keep the work under the guard
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "soct-cluster-example")
    if not (out / "synthetic" / "raw").is_dir():
        make_acquisition(out / "synthetic", preset="tiny", seed=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        print("dashboard:", client.dashboard_link)
        run = RunParams(raw_dir=str(out / "synthetic" / "raw"), out_dir=str(out / "run"))
        result = run_pipeline(run, client=client)
    print("volume:", result.volume)
    print("report:", result.report)
