# cpack -G DEB: one package, shmps_<version>_<arch>.deb, holding everything `cmake --install` puts
# into the prefix /usr. Its runtime dependencies are read off the installed programs and the
# Python extension by dpkg-shlibdeps (Debian's dpkg-dev; `tools/quickstart package` installs it);
# the Python ones, which no ELF file shows, are listed here.
set(SHMPS_DEB_MAINTAINER "shmps maintainers <maintainers@shmps.invalid>" CACHE STRING
    "The Maintainer field of the .deb (cpack -G DEB)")

set(CPACK_PACKAGE_NAME shmps)
set(CPACK_PACKAGE_VENDOR "shmps")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY "shared-memory parameter server for training on one machine")
set(CPACK_PACKAGE_DESCRIPTION
    "shmps holds a model's parameters in a shared-memory segment; worker processes pull them and \
push gradients through per-worker rings, and the server applies the updates with an optimizer \
(SGD, momentum, Adam, ...). It survives crashes of workers and of itself, and applies every push \
exactly once. This package has the programs (shmps-server, shmps-worker, shmps-launch, shmps-ctl, \
shmps-top), the C++ worker library with its CMake package and pkg-config file, and the Python \
module shmps.")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_GENERATOR DEB)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)  # shmps_0.1.0_amd64.deb
set(CPACK_DEBIAN_PACKAGE_MAINTAINER "${SHMPS_DEB_MAINTAINER}")
set(CPACK_DEBIAN_PACKAGE_SECTION science)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)

set(_depends "")
find_program(SHMPS_DPKG_SHLIBDEPS dpkg-shlibdeps)
find_program(SHMPS_FILE file)
if(SHMPS_DPKG_SHLIBDEPS AND SHMPS_FILE)
  set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
else()
  # Without dpkg-shlibdeps: the libraries the programs link on Debian 12, named by hand.
  message(STATUS "dpkg-shlibdeps or file not found: the .deb's library dependencies are the listed ones")
  list(APPEND _depends libc6 libstdc++6 libgcc-s1 libtbb12 libspdlog1.10 libfmt9 libncursesw6 libtinfo6
       libcpp-httplib0.11 libtomlplusplus3 libnuma1)
endif()
if(SHMPS_PYTHON)
  # The extension is built for this python3 (its ABI tag names the minor version) and uses numpy.
  math(EXPR _next_minor "${Python_VERSION_MINOR} + 1")
  list(APPEND _depends "python3 (>= ${Python_VERSION_MAJOR}.${Python_VERSION_MINOR})"
       "python3 (<< ${Python_VERSION_MAJOR}.${_next_minor})" python3-numpy)
endif()
list(JOIN _depends ", " CPACK_DEBIAN_PACKAGE_DEPENDS)
# What building a worker against the package needs (the headers include only the standard library).
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "g++ (>= 4:12), cmake, pkg-config, python3-torch")

include(CPack)
