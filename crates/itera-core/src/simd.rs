//! Runtime SIMD dispatch: hot loops are written once in plain Rust; `multiversion!` compiles a
//! function three times, for baseline x86-64, AVX2 + FMA and AVX-512, and picks one at run time
//! (the CPU check is cached). Kernels called from its body must be `#[inline(always)]` so they are compiled
//! into each version. (A generic closure trampoline does not work: LLVM keeps closure bodies as
//! separate baseline functions.)

/// Defines `fn NAME(args) -> R { body }` with AVX-512 and AVX2 + FMA twins chosen at run time.
///
/// `fn NAME<M>(args)` also names a type parameter, `M: math::MulAdd`, that the body passes on to
/// its arithmetic (`math::exp_with::<M>`, `M::mul_add`): the twins get `math::Fused` (one FMA
/// instruction per `a * b + c`), the baseline `math::Separate` (there a fused multiply-add is a
/// libm call). Rust never contracts `a * b + c` into an FMA by itself, so without this the twins
/// run a multiply and an add (`cargo bench -p itera-train --bench mixer`, fused: 1.06-1.21x with
/// FMAs in three alternated rounds, 2026-12-01).
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident<$m:ident>($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::extra_unused_type_parameters)]
            fn portable<$m: $crate::math::MulAdd>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    portable::<$crate::math::Fused>($($arg),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU supports AVX-512 F/BW/VL (checked by has_avx512).
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable::<$crate::math::Fused>($($arg),*)
                }
                if $crate::simd::has_avx2() {
                    // SAFETY: the CPU supports AVX2 and FMA (checked by has_avx2).
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable::<$crate::math::Separate>($($arg),*)
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $crate::multiversion! {
            $(#[$meta])* $vis fn $name<_Unused>($($arg: $ty),*) $(-> $ret)? $body
        }
    };
}

/// The instruction sets the dispatched kernels may use, in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Baseline,
    /// AVX2 + FMA.
    Avx2,
    /// AVX-512 F/BW/VL (the hand-written kernels' VNNI and F16C extras are checked separately).
    Avx512,
}

/// What this CPU supports, capped by `ITERA_SIMD=baseline|avx2|avx512` (or the older
/// `ITERA_NO_AVX512=1`), so every path can be run and tested on one machine. Checked once.
pub fn level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cap = match std::env::var("ITERA_SIMD").ok().as_deref() {
            Some("baseline") => Level::Baseline,
            Some("avx2") => Level::Avx2,
            _ if std::env::var_os("ITERA_NO_AVX512").is_some() => Level::Avx2,
            _ => Level::Avx512,
        };
        detected().min(cap)
    })
}

/// What this CPU supports, whatever `ITERA_SIMD` says (what third-party kernels such as
/// `gemm`'s dispatch on).
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx2") && has!("fma") {
            return Level::Avx512;
        }
        if has!("avx2") && has!("fma") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Whether AVX-512 F/BW/VL are usable (and allowed).
pub fn has_avx512() -> bool {
    level() == Level::Avx512
}

/// Whether AVX2 + FMA are usable (and allowed).
pub fn has_avx2() -> bool {
    level() >= Level::Avx2
}

/// The instruction set `multiversion!` functions use on this machine, for reports.
pub fn level_name() -> &'static str {
    match level() {
        Level::Avx512 => "avx512",
        Level::Avx2 => "avx2+fma",
        Level::Baseline => "baseline",
    }
}
