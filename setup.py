from setuptools import find_packages, setup

from amqpdispatcher import __version__

setup(
    name="amqp-dispatcher",
    version=__version__,
    description="A gevent daemon that runs RabbitMQ consumers described in a YAML file",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD",
    python_requires=">=3.9",
    packages=find_packages(include=["amqpdispatcher", "amqpdispatcher.*"]),
    package_data={"amqpdispatcher": ["py.typed", "config-schema.json"]},
    install_requires=["gevent>=21.1", "pika>=1.3,<2", "PyYAML>=5.1", "prometheus-client>=0.17"],
    extras_require={
        "test": ["pytest>=7", "supervisor>=4.2", "trustme>=1.0", "ruff", "mypy",
                 "types-PyYAML", "jsonschema>=4", "hypothesis>=6", "import-linter>=2.1",
                 "pytest-timeout>=2.1", "pytest-xdist>=3"],
        # The docs site (mkdocs.yml): built with --strict by scripts/test.sh.
        "docs": ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "console_scripts": ["amqp-dispatcher = amqpdispatcher.cli:run"],
        # The amqp_harness fixture (amqpdispatcher/testing/plugin.py,
        # docs/getting-started/testing.md).
        "pytest11": ["amqp_dispatcher = amqpdispatcher.testing.plugin"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
    ],
)
