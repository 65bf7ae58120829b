"""hpa's embedded model zoo: small CNNs trained by ``hpa_zoo.train``, loaded as ``zoo:NAME`` (see README.md)."""
