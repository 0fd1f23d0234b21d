#!/bin/bash
# GPU machine with ncu (Nsight Compute); writes under $OUT. Nsight Compute on the forward kernel, window off, D 128, 8k and 16k (issue 23 §1), and Flex at 16k.
set -u
export PYTHONPATH=$PWD:$PWD/tools PYTHONUNBUFFERED=1
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
echo "ncu: $NCU"; $NCU --version | tail -1
WS='[128,128,8,3,true]'
for L in 8192 16384; do
  timeout 60 python3 tools/profile_forward_ncu.py --L $L --time --runs 0 2>&1 | tail -2
  timeout 60 python3 tools/profile_forward_ncu.py --L $L --time --runs 0 --config $WS 2>&1 | tail -2
done
timeout 120 python3 tools/profile_forward_ncu.py --L 16384 --time --runs 0 --flex 2>&1 | tail -2
for L in 8192 16384; do
  timeout 150 $NCU --clock-control none --set detailed --section WarpStateStats --section SchedulerStats \
    --section InstructionStats --section SourceCounters -k regex:_alibi_fwd_kernel --launch-skip 1 --launch-count 1 \
    python3 tools/profile_forward_ncu.py --L $L --runs 2 > $OUT/ncu_fwd_L$L.txt 2>&1; echo "ncu L=$L rc=$?"; grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|limiter|bound|One or More|Issue Slots Busy|Executed Ipc" $OUT/ncu_fwd_L$L.txt | head -30
done
timeout 150 $NCU --clock-control none --set detailed --section WarpStateStats --section SchedulerStats \
  -k regex:triton_tem --launch-skip 1 --launch-count 1 python3 tools/profile_forward_ncu.py --L 16384 --runs 2 --flex > $OUT/ncu_flex_L16384.txt 2>&1; echo "ncu flex rc=$?"
grep -E "Duration|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" $OUT/ncu_flex_L16384.txt | head
ls -la $OUT
