################################################################################
#
# python-pywasm3
#
################################################################################

PYTHON_PYWASM3_VERSION = 0.5.0
PYTHON_PYWASM3_SOURCE = pywasm3-$(PYTHON_PYWASM3_VERSION).tar.gz
PYTHON_PYWASM3_SITE = https://files.pythonhosted.org/packages/source/p/pywasm3
PYTHON_PYWASM3_SETUP_TYPE = setuptools
PYTHON_PYWASM3_LICENSE = MIT
PYTHON_PYWASM3_LICENSE_FILES = LICENSE

$(eval $(python-package))
