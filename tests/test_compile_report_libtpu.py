"""Tests of compile_report's libtpu section on excerpts of real libtpu dumps (libtpu 0.0.42.1, jax 0.10.2, compiled
for a compile-only v5e:1x1 with LIBTPU_INIT_ARGS="--xla_jf_dump_to=DIR --xla_jf_dump_llo_text=true
--xla_mosaic_dump_to=DIR2"); the expected figures follow from the programs that were compiled, not from the
parsers:

- NESTED / NESTED_TREE: a Pallas kernel with grid (2,) whose body runs `fori_loop(0, 5, outer)` and, inside it,
  `fori_loop(0, 12, body, unroll=3)` with one exp per step (three `vpow2` a trip of the inner loop); the
  pipeline runs its grid loop for 2 + 2 iterations (the region tree's limit=4), and v5e's branches have 4 delay
  slots;
- WHILE / WHILE_TREE / DEDUP: the top-level program of `selective_scan(backend="chunked")` over 256 steps (one
  XLA while loop of 256 trips; two identical slicing fusions compiled once);
- UTILIZATION, ORIGINAL, SCHEDULE, MOSAIC_FUNC: the `pallas_tpu` forward kernel at (1, 256, 256, 16) float32
  (grid (batch 1, 2 channel blocks of 128, 2 chunks of 128 steps); a (16, 128) float32 state scratch; input
  windows of (128, 128) float32, double-buffered);
- PARAMETER_HLO: an optimized HLO parameter that carries v5e's default scoped VMEM limit (16 MiB).
"""
from alignmamba_jax import compile_report


NESTED = """\
   0x5 LB: > { %s564_s10 = sadd.s32 4294967295, %s513_s9 /* iteration index, stage = 1 */  ;;  %s289_s11 = sadd.s32 4294967294, %s513_s9 /* iteration index, stage = 2 */  ;;  %s513_s9 = sphi %s549_s9, %s686_s9 /* phi copy :: iteration index, stage = 0 :: iteration index, stage = 0 */  ;;  %s509_s8 = sphi %s547_s8, %s685_s8 /* copy for cssa :: phi copy :: phi copy */  ;;  %s505_s7 = sphi %s545_s7, %s684_s7 /* copy for cssa :: phi copy :: phi copy */  ;;  %s501_s6 = sphi %s543_s6, %s683_s6 /* phi copy */ } /* Start region 108 */
  0x29 LB: >> { %v523_v1 = vmov %v517_v0 /* copy for cssa :: phi copy :: phi copy */  ;;  %s527_s27 = smov 0 /* copy for cssa */  ;;  %s521_s26 = sphi %s632_s26, %s143_s26 /* phi copy */  ;;  %v517_v0 = vphi %v515_v0, %v516_v0 /* copy for cssa :: phi copy :: phi copy */ } /* Start region 97 :: Start region 81 :: End region 81 */
  0x2a LB: >>> { %s295_s16 = sshll.u32 %s529_s27, 3  ;;  %s150_s27 = sadd.s32 3, %s529_s27 /* copy for cssa */  ;;  %s529_s27 = sphi %s527_s27, %s150_s27 /* phi copy */  ;;  %v525_v1 = vphi %v523_v1, %v524_v1 /* phi copy */ } /* Start region 86 :: Start region 40 :: Start region 41 :: Start region 37 :: Start region 38 :: Start region 85 :: Start region 33 :: Start region 34 :: Start region 30 :: Start region 31 */
  0x2b   : >>> { %s153_s28 = scalar_lea.vmem %s623_s23, %s295_s16 [#allocation2]  ;;  %p147_p6 = scmp.ge.s32.totalorder %s150_s27, 12 /* loop exit test */ }
  0x2c   : >>> { %v154_v2 = vld [vmem:[%s153_s28] sm:$0xff]  ;;  %v297_v3 = vld [vmem:[%s153_s28 + $0x8] sm:$0xff]  ;;  %v299_v6 = vld [vmem:[%s153_s28 + $0x10] sm:$0xff]  ;;  %s175_s29 = scvt.s32.f32 (%p147_p6), %s521_s26  ;;  %s143_s26 = sadd.s32 (%p147_p6), 1, %s521_s26 /* copy for cssa */ }
  0x2d   : >>> { %v155_v4 = vmul.f32 1.442695, %v154_v2  ;;  %v163_v5 = vmul.f32 1.442695, %v297_v3  ;;  %v171_v7 = vmul.f32 1.442695, %v299_v6 }
  0x2e   : >> { %v176_v17 = vstv (%p147_p6), %s175_s29  ;;  %p140_p13 = scmp.ge.s32.totalorder (%p147_p6), %s143_s26, 5 /* loop exit test */ }
  0x2f   : >>> { %387 = vpow2.f32 %v155_v4 }
  0x30   : >>> { %389 = vpow2.f32 %v163_v5 }
  0x31   : >>> { %391 = vpow2.f32 %v171_v7 }
  0x32   : >>> { %v388_v8 = vpop.eup %387 }
  0x33   : >>> { %v157_v9 = vmul.f32 %v525_v1, %v388_v8  ;;  %v390_v10 = vpop.eup %389 }
  0x34   : >>> { %v392_v13 = vpop.eup %391 }
  0x35   : >>> { %v158_v11 = vadd.f32 1.0, %v157_v9 }
  0x36   : >>> { %v165_v12 = vmul.f32 %v390_v10, %v158_v11 }
  0x37   : >>> { %v166_v14 = vadd.f32 1.0, %v165_v12 }
  0x38   : >>> { %v173_v15 = vmul.f32 %v392_v13, %v166_v14  ;;  %149 = sbr.rel (!%p147_p6) target = $region86 }
  0x39   :  {}
  0x3a   : >>> { %v174_v16 = vadd.f32 1.0, %v173_v15 /* copy for cssa */ } /* End region 86 :: End region 40 :: End region 41 */
  0x3b   :  {}
  0x3c   : >>> { %v524_v1 = vmov %v174_v16 /* copy for cssa */  ;;  %v177_v18 = vadd.f32 (%p147_p6), %v176_v17, %v174_v16 /* copy for cssa */ } /* End region 97 :: End region 37 :: End region 38 :: End region 85 :: End region 33 :: End region 34 */
  0x3d   : > { %142 = sbr.rel (!%p140_p13) target = $region97  ;;  %s301_s30 = sshll.u32 (%p140_p13), %s564_s10, 3 } /* Start region 96 */
  0x4c   : > { %498 = vsyncadd (%p317_p1), %s207_s25, 4294967168  ;;  %p14_p6 = scmp.ge.s32.totalorder %s568_s12, 4 /* loop exit test */  ;;  %s683_s6 = smov %s505_s7 } /* End region 108 :: Start region 6 :: End region 6 :: Start region 7 :: End region 7 :: Start region 3 :: Start region 4 :: Start region 107 */
  0x4d   : > { %s684_s7 = smov %s509_s8  ;;  %s685_s8 = smov %s580_s15 }
  0x4e   : > { %s686_s9 = smov %s568_s12  ;;  %16 = sbr.rel (!%p14_p6) target = $region108 } /* End region 3 */
  0x4f   :  {}
  0x50   :  {}
  0x51   :  {}
  0x52   :  {} /* End region 4 :: End region 107 */
  0x53   :  { %213 = vsyncpa [#allocation3], 1 }
"""
NESTED_TREE = """\
    loop: start=0, step=1, limit=4
    $region103: #{probe_kernel.1} parent=1 // loop_pre_header
    $region108: #{probe_kernel.1} parent=1 // loop_body
        loop: start=0, step=1, limit=5
        $region92: #{probe_kernel.1} parent=23 // loop_pre_header
        $region97: #{probe_kernel.1} parent=23 // loop_body
          loop: start=0, step=3, limit=12
          $region81: #{probe_kernel.1} parent=97 // loop_pre_header
          $region86: #{probe_kernel.1} parent=97 // loop_body
          $region40: #{probe_kernel.1} parent=97 // loop_footer
          $region85: #{probe_kernel.1} parent=97 // loop_exit
        $region33: #{probe_kernel.1} parent=23 // loop_footer
        $region96: #{probe_kernel.1} parent=23 // loop_exit
    $region6: #{probe_kernel.1} parent=1 // loop_footer
    $region107: #{probe_kernel.1} parent=1 // loop_exit
"""
WHILE = """\
  0xd9 LB: > { %s964_s1 = sld [smem:[#allocation35_spill]] } /* Start region 189 :: Start region 675 :: Start region 72 */
  0xe4   : > { %357 = inlined_call %s849_s0, %s964_s1, %s850_s2 /* %fusion.8 = fusion(%get-tuple-element.140, %copy.9) */ }
  0xed   : > { %373 = inlined_call %s851_s0, %s967_s1, %s852_s2 /* %fusion.9 = fusion(%get-tuple-element.139, %copy.9) */ }
 0x114   : > { %444 = inlined_call %s860_s0, %s861_s1, %s862_s2, %s971_s3, %s970_s4, %s864_s5, %s865_s6, %s866_s7, %s863_s8 /* %multiply_reduce_fusion.2 = fusion(%fusion.8, %fusion.9, %mul.56, %get-tuple-element.125, %compare.3, %get-tuple-element.141, %bitcast.32) */ }
 0x121   : > { %s976_s1 = sld [smem:[#allocation35_spill]]  ;;  %471 = compiler-scheduling-barrier  ;;  %474 = compiler-scheduling-barrier  ;;  %294 = compiler-scheduling-barrier  ;;  %295 = compiler-scheduling-barrier  ;;  %296 = compiler-scheduling-barrier  ;;  %298 = compiler-scheduling-barrier  ;;  %299 = compiler-scheduling-barrier  ;;  %300 = compiler-scheduling-barrier  ;;  %301 = compiler-scheduling-barrier } /* Start/End empty region 696 :: Start/End empty region 115 :: Start/End empty region 64 :: Start/End empty region 65 :: Start region 62 :: Start/End empty region 67 :: Start/End empty region 68 :: Start/End empty region 69 :: Start region 70 */
 0x122   : > { %s977_s6 = sadd.s32 1, %s976_s1 /* copy for cssa */ }
 0x123   : > { %p302_p3 = scmp.lt.s32.totalorder %s977_s6, 256 }
 0x124   : > { %s303_s7 = scalar_select /*predicate=*/%p302_p3, /*on_true=*/1, /*on_false=*/0 } /* End region 70 */
 0x125   : > { %s978_s1 = smov %s977_s6  ;;  %304 = compiler-scheduling-barrier } /* Start region 63 :: Start region 188 :: Start region 697 */
 0x126   : > { %s305_s8 = sand.u32 1, %s303_s7  ;;  %979 = sst [smem:[#allocation35_spill]] %s978_s1 }
 0x127   : > { %p306_p4 = scmp.eq.s32.totalorder %s305_s8, 0 } /* End region 62 */
 0x128   :  { %308 = sbr.rel (!%p306_p4) target = $region189 }
 0x129   :  {}
 0x12a   :  {}
 0x12b   :  {}
 0x12c   :  {} /* End region 63 :: End region 188 */
 0x12d   :  { %480 = vtrace 2415919123  ;;  %478 = compiler-scheduling-barrier } /* End region 3 :: End region 60 :: End region 697 */
"""
WHILE_TREE = """\
      $region180: #{while.4} parent=60 // loop_pre_header
      $region189: #{while.4} parent=60 // loop_body
"""
DEDUP = """\
key:fusion.8
ordinal:5
equivalent_hlos[size=2]:
  fusion.8
  fusion.9
key:constant_dynamic-slice_fusion.6
ordinal:7
equivalent_hlos[size=2]:
  constant_dynamic-slice_fusion.6
"""
UTILIZATION = """\
== CAPACTIY:
MXU, XLU, VALU, VPOP, EUP, VLOAD, VLOAD:FILL, VSTORE, VSTORE:SPILL, SALU
    4     3     4     2     1     3     3     1     1     2
== UTILIZATION:
0 0 4 0 0 2 0 0 0 0
0 0 4 0 0 2 0 0 0 0
0 0 3 0 0 2 0 0 0 0
0 1 3 0 0 1 0 0 0 1
0 3 1 0 0 3 0 0 0 0
"""
ORIGINAL = """\
  #allocation0 [shape = 'u32[]', space=smem, size = 0x4, offset = 0x4, fixed_abs, tag = 'smem constant byte address 0x4 - core index']
  #allocation1 [shape = 'u32[72,128]{1,0:T(1,128)}', space=vmem, size = 0x9000, scoped, tag = 'internal scratch']
  #allocation2 [shape = 'f32[16,128]{1,0:T(8,128)}', space=vmem, size = 0x2000, scoped, tag = 'scratch operand']
    #allocation3 [shape = 'u8[131072]{0}', space=vmem, size = 0x20000, scoped, tag = 'input window allocation for operator input 0. The window shape is f32[1,128,128], while the full shape is f32[1,256,256]. The u8 shape/size shown above represents the raw byte size of this window in VMEM. This allocation has 2 buffering levels.']
    #allocation4 [shape = 's32[2]{0}', space=sflag, size = 0x8, scoped, tag = 'scoped memory for selective_scan_fwd_tpu.1']
"""
SCHEDULE = """\
Schedule analysis:
	total scheduled bundles:    1988
	empty scheduled bundles:    11
	non empty scheduled bundles: 1977
"""
PARAMETER_HLO = """\
  %args_0_.1 = f32[192,128]{1,0:T(8,128)} parameter(0), sharding={replicated}, frontend_attributes={xla.sdy.sharding="#sdy.sharding<@empty_mesh, [{}, {}]>"}, metadata={op_name="args[0]"}, backend_config={"flag_configs":[],"scoped_memory_configs":[{"memory_space":"1","offset":"0","size":"16777216"}],"used_scoped_memory_configs":[]}
"""
MOSAIC_FUNC = """\
  func.func @selective_scan_fwd_tpu(%arg0: i32, %arg1: i32, %arg2: i32, %arg3: memref<1x128x128xf32, #tpu.memory_space<vmem>>, %arg4: memref<1x128x128xf32, #tpu.memory_space<vmem>>, %arg5: memref<16x128xf32, #tpu.memory_space<vmem>>, %arg6: memref<1x16x128xf32, #tpu.memory_space<vmem>>, %arg7: memref<1x16x128xf32, #tpu.memory_space<vmem>>, %arg8: memref<1x16x128xf32, #tpu.memory_space<vmem>>, %arg9: memref<1x128x128xf32, #tpu.memory_space<vmem>>, %arg10: memref<1x1x16x128xf32, #tpu.memory_space<vmem>>, %arg11: memref<1x16x128xf32, #tpu.memory_space<vmem>>, %arg12: memref<16x128xf32, #tpu.memory_space<vmem>>) attributes {dimension_semantics = [#tpu.dimension_semantics<parallel>, #tpu.dimension_semantics<parallel>, #tpu.dimension_semantics<arbitrary>], iteration_bounds = array<i64: 1, 2, 2>, 
"""


def _loops(text, tree):
    bundles = compile_report.final_bundles(text)
    return bundles, compile_report.loops(bundles, compile_report.loop_bodies(tree))


def test_nested_loops_are_found_with_their_trip_counts_and_delay_slots():
    bundles, loops = _loops(NESTED, NESTED_TREE)
    assert len(bundles) == len(NESTED.splitlines())
    by_start = {loop["start"]: loop for loop in loops}
    assert sorted(by_start) == [0, 1, 2]
    grid, outer, inner = by_start[0], by_start[1], by_start[2]
    assert (grid["trips"], outer["trips"], inner["trips"]) == (4, 5, 4)
    lines = NESTED.splitlines()
    assert "target = $region86" in lines[16] and inner["end"] == 16 + 4      # the inner branch and 4 delay slots
    assert "target = $region97" in lines[21] and outer["end"] == 21          # the next bundle is outside it
    assert "target = $region108" in lines[24] and grid["end"] == 24 + 4


def test_multiplicities_count_each_exponential_once_per_step_of_the_kernel():
    bundles, loops = _loops(NESTED, NESTED_TREE)
    exps = [i for i, line in enumerate(NESTED.splitlines()) if "vpow2" in line]
    assert len(exps) == 3
    grid = min(loops, key=lambda loop: loop["start"])
    per_step = compile_report.multiplicities(len(bundles), loops, scope=grid)
    assert sum(per_step[i] for i in exps) == 5 * 12                  # one exp per step of the two fori_loops
    total = compile_report.multiplicities(len(bundles), loops)
    assert sum(total[i] for i in exps) == 4 * 5 * 12                 # over the grid loop's 4 iterations
    assert total[-1] == 1 and per_step[-1] == 0                      # the bundle after the grid loop


def test_an_xla_while_loop_takes_its_trip_count_from_its_exit_compare():
    bundles, loops = _loops(WHILE, WHILE_TREE)
    assert compile_report.loop_bodies(WHILE_TREE) == {189: None}      # no static bounds in the region tree
    assert [loop["trips"] for loop in loops] == [256]
    calls = [b["call"] for b in bundles if b["call"]]
    assert calls[:2] == ["fusion.8", "fusion.9"]
    dedup = compile_report.deduplication_map(DEDUP)
    assert dedup["fusion.9"] == dedup["fusion.8"] == "fusion.8"


def test_unit_utilization_reads_the_capacity_and_one_row_per_bundle():
    table = compile_report.unit_utilization(UTILIZATION)
    assert dict(zip(table["units"], table["capacity"])) == {
        "MXU": 4, "XLU": 3, "VALU": 4, "VPOP": 2, "EUP": 1, "VLOAD": 3, "VLOAD:FILL": 3, "VSTORE": 1,
        "VSTORE:SPILL": 1, "SALU": 2}
    assert len(table["rows"]) == len(UTILIZATION.splitlines()) - 4
    assert all(len(row) == 10 for row in table["rows"])


def test_busy_percent_is_slots_used_over_slots_available():
    cost = {"bundles": 10, "units": {"XLU": 15, "EUP": 5, "MXU": 0}, "capacity": {"XLU": 3, "EUP": 1, "MXU": 4}}
    assert compile_report.busy_percent(cost) == {"XLU": 50.0, "EUP": 50.0, "MXU": 0.0}


def test_scoped_vmem_counts_the_scoped_vmem_allocations_only():
    internal_scratch, state_scratch, input_window = 72 * 128 * 4, 16 * 128 * 4, 2 * 128 * 128 * 4
    assert compile_report.scoped_vmem_bytes(ORIGINAL) == internal_scratch + state_scratch + input_window


def test_total_bundles_and_vmem_limit():
    assert compile_report.total_scheduled_bundles(SCHEDULE) == 1988
    assert compile_report.vmem_limits(PARAMETER_HLO) == {"args_0_.1": 16 * 2 ** 20}


def test_mosaic_grid_reads_the_kernels_iteration_bounds(tmp_path):
    path = tmp_path / "1796598407078764501-0001-mosaic-dump-anonymous-original.txt"
    path.write_text(MOSAIC_FUNC + "\n")
    assert compile_report.mosaic_grid([str(path)], "selective_scan_fwd_tpu") == (1, 2, 2)
    assert compile_report.mosaic_grid([str(path)], "selective_scan_bwd_tpu") is None


def test_llo_programs_groups_dump_files_by_program_and_pass():
    programs = compile_report.llo_programs([
        "/d/1796598427287712317-TLP-00-deduplication-map.txt",
        "/d/1796598427287712317-TLP-73-final_bundles.txt",
        "/d/1796598427536664959-constant_dynamic-slice_fusion.6-62-pre-delay_hlo-static-per-bundle-utilization.txt",
        "/d/1796598407616482570-selective_scan_fwd_tpu.1-02-original.txt",
        "/d/1796598407616482570-selective_scan_fwd_tpu.1-72-final_bundles.txt",
        "/d/1796598406958513403-<late-finalization>-68-final_bundles.txt"])
    assert set(programs) == {"TLP", "constant_dynamic-slice_fusion.6", "selective_scan_fwd_tpu.1",
                             "<late-finalization>"}
    assert set(programs["selective_scan_fwd_tpu.1"]) == {"original", "final_bundles"}
    assert set(programs["constant_dynamic-slice_fusion.6"]) == {"pre-delay_hlo-static-per-bundle-utilization"}


def test_libtpu_dump_env_keeps_the_existing_flags():
    env = compile_report.libtpu_dump_env("/a", "/b", {"LIBTPU_INIT_ARGS": "--xla_foo=1", "PATH": "/bin"})
    assert env["LIBTPU_INIT_ARGS"] == ("--xla_foo=1 --xla_jf_dump_to=/a --xla_jf_dump_llo_text=true "
                                       "--xla_mosaic_dump_to=/b")
    assert env["PATH"] == "/bin"
