# Compile settings of csrc/hostfuse/multidevice/comm that only two files need.
#
# gloo_backend.cpp includes torch's ProcessGroupGloo.hpp, which includes Gloo
# headers that torch's wheels do not ship; csrc/hostfuse/multidevice/comm/gloo_shim stands
# in for them (its README says why that is sound). Only this file sees it.
#
# nccl_backend.cpp includes ProcessGroupNCCL.hpp, which includes <nccl.h>:
# the header of the NCCL wheel that torch depends on (nvidia-nccl-cu13, next
# to torch in site-packages), or a system one. Without it the NCCL backend
# is left out and asking for it is a clear error at run time.

set(_hostfuse_md "${CMAKE_CURRENT_SOURCE_DIR}/csrc/hostfuse/multidevice/comm")

set_source_files_properties("${_hostfuse_md}/gloo_backend.cpp"
  PROPERTIES INCLUDE_DIRECTORIES "${_hostfuse_md}/gloo_shim")

# A wheel's Torch_DIR is <site-packages>/torch/share/cmake/Torch.
get_filename_component(_hostfuse_site_packages "${Torch_DIR}/../../../.."
                       ABSOLUTE)
find_path(HOSTFUSE_NCCL_INCLUDE_DIR nccl.h
          HINTS "${_hostfuse_site_packages}/nvidia/nccl/include"
                "${CUDAToolkit_INCLUDE_DIRS}"
          PATHS /usr/include /usr/local/include)
if(HOSTFUSE_NCCL_INCLUDE_DIR)
  message(STATUS "hostfuse: nccl.h from ${HOSTFUSE_NCCL_INCLUDE_DIR}")
  set_source_files_properties("${_hostfuse_md}/nccl_backend.cpp"
    PROPERTIES INCLUDE_DIRECTORIES "${HOSTFUSE_NCCL_INCLUDE_DIR}"
               COMPILE_DEFINITIONS HOSTFUSE_HAS_NCCL=1)
else()
  message(WARNING "hostfuse: nccl.h not found; the NCCL backend is left out")
endif()
