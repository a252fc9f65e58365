"""medcap: radiology image captioning with Keras 3, tf.data and TensorFlow Serving."""

from setuptools import find_packages, setup

# The stack that is known to install and import together (see DEVELOPERS.md).
CORE = [
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "keras==3.15.*",
    "keras-hub==0.32.*",
    "tensorflow-serving-api==2.21.0",
    "grpcio",
    "numpy",
    "pillow",
    "matplotlib",
    "pandas",
    "pydicom",
    # pixel-data decoders for compressed DICOM, as PACS archives store it (JPEG Lossless, JPEG-LS, JPEG 2000,
    # HTJ2K): GDCM (BSD) and pylibjpeg's OpenJPEG plugin (MIT); pylibjpeg-libjpeg (GPL) is left out, GDCM covers it
    "python-gdcm",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pycocoevalcap",
    "tqdm",
]
EXTRAS = {
    # torch==2.13.0 is the CPU build on local disk; any other spec pulls CUDA.
    "torch": ["torch==2.13.0", "transformers", "safetensors"],
    "app": ["streamlit"],
    "notebooks": ["nbclient", "nbformat", "ipykernel"],
    # playwright drives Debian's chromium, never downloads one; atheris (libFuzzer) for benchmarks/fuzz_atheris.py
    "test": ["pytest", "hypothesis", "psutil", "atheris", "playwright"],
}
EXTRAS["all"] = sorted({p for group in EXTRAS.values() for p in group})

setup(
    name="medcap",
    version="0.1.0",
    description="Radiology image captioning: CNN-GRU and GIT in Keras 3, served by TF Serving",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["keras_models*", "pipelines*", "export*", "serving*"]),
    include_package_data=True,
    package_data={"pipelines": ["examples/*.csv", "examples/*.md", "examples/train/*", "examples/valid/*"]},
    install_requires=CORE,
    extras_require=EXTRAS,
)
